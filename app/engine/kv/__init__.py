"""KV memory: the caches the runners write, their budget account and the prefix cache."""
