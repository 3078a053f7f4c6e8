"""ollama-distributed: one Linux machine, or many, as a single LLM endpoint."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("ollama-distributed")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
