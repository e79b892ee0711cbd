"""codeaccel: fast, cheap and lossless LLM code generation."""

__version__ = "0.1.0"
