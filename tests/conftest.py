"""Shared fixtures: tiny models built at test time, and a scripted fake engine."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import pytest

import tiny_models
from codeaccel.engines.base import Engine
from codeaccel.models.registry import BUNDLED


def pytest_collection_modifyitems(config, items):
    """Skip the realmodel tier, with the reason, where the bundled models are not installed."""
    missing = [m for m in BUNDLED.values() if importlib.util.find_spec(m.part_modules()[0]) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"bundled models not installed ({missing[0].part_packages()[0]}): make install")
    for item in items:
        if "realmodel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    return str(tiny_models.build_gguf_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture(scope="session")
def fim_gguf(tmp_path_factory) -> str:
    """tiny_gguf with Qwen2.5-Coder's fill-in-the-middle and repository tokens."""
    return str(tiny_models.build_gguf_model(tmp_path_factory.mktemp("fim") / "tiny-fim.gguf", fim=True))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> str:
    return str(tiny_models.build_hf_model(tmp_path_factory.mktemp("hf") / "tiny-hf"))


@pytest.fixture(scope="session")
def tiny_gguf_draft(tmp_path_factory) -> str:
    """Same architecture and tokenizer as tiny_gguf, other weights: a draft that is often rejected."""
    return str(tiny_models.build_gguf_model(tmp_path_factory.mktemp("gguf-draft") / "tiny-draft.gguf", seed=1))


@pytest.fixture(scope="session")
def tiny_hf_draft(tmp_path_factory) -> str:
    return str(tiny_models.build_hf_model(tmp_path_factory.mktemp("hf-draft") / "tiny-hf-draft", seed=1))


class ScriptedEngine(Engine):
    """A fake engine whose next token is a fixed function of the last one.

    Vocabulary: token i detokenizes to ``pieces[i]``; after token t the logits put a
    large mass on ``successor[t]``. Token 0 is the end-of-generation token. Lets the
    decode-loop logic (stop strings, EOS, max tokens, cache reuse) be tested exactly.
    """

    kind = "scripted"

    def __init__(self, pieces: Sequence[str], successor: dict[int, int], n_ctx: int = 64):
        super().__init__("scripted", n_vocab=len(pieces), n_ctx=n_ctx, eog_token_ids=frozenset({0}))
        self.pieces = list(pieces)
        self.successor = successor
        self.forward_calls: list[list[int]] = []

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        out, i = [], 0
        while i < len(text):  # greedy longest match
            best = max(
                (j for j, p in enumerate(self.pieces) if p and text.startswith(p, i)), key=lambda j: len(self.pieces[j])
            )
            out.append(best)
            i += len(self.pieces[best])
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.pieces[t] for t in tokens)

    def apply_chat_template(self, messages):
        return "".join(m["content"] for m in messages)

    def _forward(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        self.forward_calls.append(list(tokens))
        logits = np.zeros((len(tokens), self.n_vocab), np.float32)
        for row, t in enumerate(tokens):
            logits[row, self.successor.get(t, 0)] = 10.0
        return logits if all_logits else logits[-1:]

    def _truncate(self, n_tokens: int) -> None:
        pass


@pytest.fixture
def scripted() -> ScriptedEngine:
    # "a" -> "b" -> "c" -> "\n" -> "END" -> "a" ... ; "x" -> EOS
    pieces = ["<eos>", "a", "b", "c", "\n", "END", "x"]
    return ScriptedEngine(pieces, successor={1: 2, 2: 3, 3: 4, 4: 5, 5: 1, 6: 0})
