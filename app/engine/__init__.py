"""The inference engine: continuous batching, KV caches, the model forwards, sampling. It knows nothing of HTTP.

Import rules: pyproject.toml, [tool.importlinter]; the flow: docs/design.md.
"""
