"""Runners: the batches that execute a StepPlan on a forward, and what runs inside a step."""
