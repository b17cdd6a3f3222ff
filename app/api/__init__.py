"""The HTTP layer: one package or module per route family (TGI, OpenAI, ...) over shared request plumbing.

Import rules: pyproject.toml, [tool.importlinter].
"""
