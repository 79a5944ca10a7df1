"""qconv: offline AWQ / int8-KV quantization and a bundled runtime for decoder-only LLMs."""

__version__ = "0.1.0"


class QconvError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""
