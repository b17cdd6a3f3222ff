"""Loading a model: reading, quantizing, compiling, choosing its runner and self-testing it."""
