"""Sampling parameters and the pure functions that turn logits into a token.

Every decoding method (autoregressive, speculative, retrieval) goes through these
functions, so the target distribution is defined once: logits are divided by the
temperature, then top-k, then top-p (nucleus) filtering is applied, in the order
Hugging Face's logits warpers use. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codeaccel.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token.

    temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1 = all).
    seed: seeds the sampler's random generator (None: fresh entropy).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Warp logits into the distribution the sampler draws from.

    logits: [..., vocab] float. Returns probabilities of the same shape, each row
    summing to 1, zero outside the top-k / top-p set. With temperature 0 the result
    is one-hot on the argmax (the greedy "distribution").
    """
    logits = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, logits.argmax(axis=-1)[..., None], 1.0, axis=-1)
        return probs
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        # kth largest value per row; ties with it are kept (as in HF's TopKLogitsWarper).
        kth = -np.partition(-scaled, params.top_k - 1, axis=-1)[..., params.top_k - 1 : params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from probs  # [vocab] (inverse-CDF; one uniform draw per token)."""
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if token >= len(probs):  # rounding put the draw past the end: the last token with mass, never a zero one
        token = int(np.flatnonzero(probs)[-1])
    return token


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token from logits  # [vocab]: argmax when greedy, else a sample."""
    if params.greedy:
        return int(np.argmax(logits))
    return sample(logits_to_probs(logits, params), rng)
