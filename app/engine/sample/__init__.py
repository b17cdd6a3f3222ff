"""Sampling: choosing each row's next token from its logits and settings."""
