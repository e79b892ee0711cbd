"""What a tuned draft learns from: the accepted text, the target's greedy tokens, or its distributions.

``accepted``: the completion the user accepted, as text. ``target``: the target's own greedy
continuation of the prompt (what a greedy draft must predict to be accepted). ``distill``: the
same continuation with the target's next-token distribution at each position, kept as its
``k`` most probable tokens (:class:`TeacherTop`), so the draft is trained toward the whole
distribution and not one token of it (knowledge distillation, as Online Speculative Decoding
and DistillSpec do; the loss is in :func:`codeaccel.personalization.finetune.soft_cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from codeaccel.engines.base import Engine
from codeaccel.errors import InternalError, UserError

Teach = Literal["target", "accepted", "distill"]
TEACH_CHOICES: tuple[str, ...] = get_args(Teach)
TEACHER_TOP_K = 32  # tokens kept per position (the target's top 32 hold nearly all its mass on code)


def check_teach(value: str) -> Teach:
    if value not in TEACH_CHOICES:
        raise UserError(f"teach is one of {', '.join(TEACH_CHOICES)}; got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class TeacherTop:
    """The target's most probable next tokens at each position of a continuation.

    Row j is the distribution that predicts continuation token j: ``ids`` # [n, k] int64 and
    ``probs`` # [n, k] float32, the target's probabilities of those tokens (each row sums to at
    most 1: the mass outside the top k is left out, and the loss renormalises)."""

    ids: np.ndarray
    probs: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape != self.probs.shape:
            raise InternalError(f"teacher ids {self.ids.shape} and probs {self.probs.shape} must be the same [n, k]")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to_record(self) -> dict:
        return {"ids": self.ids.tolist(), "probs": np.round(self.probs, 5).tolist()}

    @classmethod
    def from_record(cls, record: dict) -> TeacherTop:
        return cls(np.asarray(record["ids"], dtype=np.int64), np.asarray(record["probs"], dtype=np.float32))


def top_k_of(logits: np.ndarray, k: int) -> TeacherTop:
    """logits # [n, vocab] → the k most probable tokens of each row and their probabilities."""
    if k < 1:
        raise InternalError(f"top k needs k >= 1, got {k}")
    k = min(k, logits.shape[-1])
    logits = logits.astype(np.float64)
    ids = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    chosen = np.take_along_axis(logits, ids, axis=-1)
    order = np.argsort(-chosen, axis=-1)
    ids, chosen = np.take_along_axis(ids, order, axis=-1), np.take_along_axis(chosen, order, axis=-1)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return TeacherTop(ids.astype(np.int64), np.exp(chosen - log_z).astype(np.float32))


def teacher_top_k(target: Engine, prompt: Sequence[int], continuation: Sequence[int],
                  k: int = TEACHER_TOP_K) -> TeacherTop:  # fmt: skip
    """The target's top-k distribution at every position of ``continuation`` after ``prompt``.

    Cheap right after the target generated the continuation: the prompt still in its cache is
    reused (:meth:`Engine.prefill`), and only the continuation is evaluated again, in one batch.
    The cache is left holding prompt + continuation[:-1]."""
    prompt, continuation = [int(t) for t in prompt], [int(t) for t in continuation]
    if not prompt or not continuation:
        raise UserError("a teacher distribution needs a prompt and a continuation")
    if len(prompt) > 1:
        target.prefill(prompt[:-1])
    else:
        target.reset()
    logits = target.eval(prompt[-1:] + continuation[:-1])  # [len(continuation), vocab]: row j predicts token j
    return top_k_of(logits, k)
