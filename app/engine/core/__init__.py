"""The engine's core, plain Python: request and step types, sequences, admission and the Scheduler."""
