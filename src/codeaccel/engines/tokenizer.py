"""What "the same tokenizer" means, defined once.

Two uses need it: a datastore must have been built in the ids of the engine that
drafts from it, and a draft model must mean by every id what the target means. Both
compare the same :func:`tokenizer_fingerprint`: the vocabulary size and how the
tokenizer splits a probe text of code, docstrings and non-ASCII characters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from codeaccel.engines.base import Engine
from codeaccel.errors import UserError

PROBE = "def f(x: int) -> list[str]:\n    return [str(i) for i in range(x)]  # ü ✓\n"

Tokenize = Callable[[str], list[int]]


def tokenizer_fingerprint(n_vocab: int, tokenize: Tokenize) -> str:
    """Identifies a tokenizer by its vocabulary size and how it splits :data:`PROBE`."""
    return hashlib.sha256(json.dumps([n_vocab, tokenize(PROBE)]).encode()).hexdigest()[:16]


def engine_fingerprint(engine: Engine) -> str:
    return tokenizer_fingerprint(engine.n_vocab, engine.tokenize)


def check_same_tokenizer(draft: Engine, target: Engine) -> None:
    """Refuse a draft whose token ids mean something else to the target (their fingerprints differ)."""
    if draft.n_vocab != target.n_vocab:
        raise UserError(
            f"draft model {draft.model_name} has a vocabulary of {draft.n_vocab} tokens, the target "
            f"{target.model_name} {target.n_vocab}: speculative decoding needs the same tokenizer"
        )
    if engine_fingerprint(draft) != engine_fingerprint(target):
        raise UserError(
            f"draft model {draft.model_name} and target {target.model_name} tokenize text differently: "
            "speculative decoding needs the same tokenizer"
        )
