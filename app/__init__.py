"""textgen: a text-generation and embedding service for Hugging Face causal language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("textgen-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
