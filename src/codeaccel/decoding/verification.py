"""Acceptance rules: which draft tokens the target keeps, and the token it adds.

Every rule takes the draft ``x_1..x_k`` and the target's logits at the k+1 positions
that predict ``x_1..x_k`` and the token after them, ``target_logits  # [k+1, vocab]``,
and returns a :class:`Verdict`: the **accepted** draft prefix ``x_1..x_n`` followed by
exactly one more token, either a **recovered** token (position n+1 rejected, n < k) or
a **bonus** token (all k accepted). So one verification commits n+1 tokens, and the
output has the distribution the target alone would give (Leviathan et al. 2023,
Chen et al. 2023; vocabulary as in vLLM's rejection sampler).

Four rules, chosen by :func:`verify`:

* :func:`verify_greedy`, temperature 0: accept while ``x_i == argmax p_i``, then add
  ``argmax p_{n+1}``. Identical to greedy autoregressive decoding.
* :func:`verify_rejection`, sampling with draft probabilities q: accept ``x_i`` with
  probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection sample the
  recovered token from the normalised residual ``max(0, p_i − q_i)``; if all are
  accepted sample the bonus token from ``p_{k+1}``. Lossless: for any q,
  ``P(token) = q(x)·min(1, p/q) + (1 − Σ min(p, q))·max(0, p − q)/Σ max(0, p − q) = p(x)``.
* :func:`verify_sample_and_compare`, sampling without draft probabilities (retrieval
  drafts): draw ``y_i ~ p_i`` as autoregressive decoding would, accept while
  ``y_i == x_i``; the first mismatch ``y_i`` is the recovered token. Lossless because
  every committed token is a sample of p; with the same random stream it reproduces
  autoregressive sampling token for token.
* :func:`verify_tree`, several draft branches without probabilities (a token tree):
  sample-and-compare walking down the tree: draw ``y ~ p`` at the current node and
  move to the child holding ``y``; the first ``y`` no child holds is the recovered
  token, and a leaf's own next token is the bonus. Lossless for the same reason.

``p`` is always the *warped* distribution (temperature, top-k, top-p applied, see
:mod:`codeaccel.decoding.sampling`), identically for draft and target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.decoding.sampling import SamplingParams, logits_to_probs, next_token, sample


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]  # accepted draft tokens, then one recovered or bonus token: [n_accepted + 1]
    n_accepted: int  # how many draft tokens were accepted (0..k)
    n_drafted: int  # k (for a tree: its number of nodes)
    bonus: bool  # the last token is the target's own after a fully accepted chain or tree branch (not a recovery)
    path: list[int] | None = None  # tree drafts: the accepted nodes, root to leaf

    @property
    def judged(self) -> int:
        """Draft tokens the target judged along the path it took: the accepted ones and, unless the chain or
        branch was accepted whole, the first rejected one (a tree's other branches are not its draft's
        failures). What a per-token acceptance rate counts over."""
        return self.n_accepted + (0 if self.bonus else 1)


def _check(draft_tokens: Sequence[int], target_logits: np.ndarray) -> int:
    k = len(draft_tokens)
    if target_logits.ndim != 2 or target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits must be [k+1={k + 1}, vocab], got {target_logits.shape}")
    return k


def verify_greedy(draft_tokens: Sequence[int], target_logits: np.ndarray) -> Verdict:
    """Longest prefix of the draft equal to the target's argmax, then the target's own next token.

    draft_tokens: [k]; target_logits: [k+1, vocab].
    """
    k = _check(draft_tokens, target_logits)
    target_tokens = target_logits.argmax(axis=-1)  # [k+1]
    n = 0
    while n < k and int(target_tokens[n]) == int(draft_tokens[n]):
        n += 1
    return Verdict(
        tokens=[int(t) for t in draft_tokens[:n]] + [int(target_tokens[n])], n_accepted=n, n_drafted=k, bonus=n == k
    )


def verify_rejection(
    draft_tokens: Sequence[int],
    draft_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator,
) -> Verdict:
    """Speculative (rejection) sampling: lossless for any draft distribution.

    draft_tokens: [k], each sampled from the matching row of draft_probs  # [k, vocab];
    target_probs: [k+1, vocab] (warped target distributions). Uses one uniform per
    draft token examined, plus one draw for the recovered or bonus token.
    """
    k = _check(draft_tokens, target_probs)
    if draft_probs.shape != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [k={k}, vocab={target_probs.shape[1]}], got {draft_probs.shape}")
    for i, x in enumerate(draft_tokens):
        p, q = target_probs[i, x], draft_probs[i, x]
        if rng.random() * q < p:  # accept with probability min(1, p/q)
            continue
        residual = np.maximum(target_probs[i] - draft_probs[i], 0.0)  # [vocab]
        mass = residual.sum()
        # mass > 0 whenever a rejection is possible; the fallback only guards rounding.
        recovered = sample(residual / mass if mass > 0 else target_probs[i], rng)
        return Verdict(tokens=[int(t) for t in draft_tokens[:i]] + [recovered], n_accepted=i, n_drafted=k, bonus=False)
    extra = sample(target_probs[k], rng)
    return Verdict(tokens=[int(t) for t in draft_tokens] + [extra], n_accepted=k, n_drafted=k, bonus=True)


def verify_sample_and_compare(
    draft_tokens: Sequence[int], target_logits: np.ndarray, params: SamplingParams, rng: np.random.Generator
) -> Verdict:
    """Sample the target at each position as autoregressive decoding would; keep the draft while it agrees.

    draft_tokens: [k] (no probabilities needed); target_logits: [k+1, vocab].
    Rows are warped lazily, so a rejection at position 1 costs one softmax, not k+1.
    """
    k = _check(draft_tokens, target_logits)
    for i in range(k + 1):
        y = next_token(target_logits[i], params, rng)
        if i == k or y != int(draft_tokens[i]):
            return Verdict(tokens=[int(t) for t in draft_tokens[:i]] + [y], n_accepted=i, n_drafted=k, bonus=i == k)
    raise AssertionError("unreachable")


def verify_tree(
    draft_tokens: Sequence[int],
    draft_parents: Sequence[int],
    target_logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
) -> Verdict:
    """Sample-and-compare down a token tree (greedy: follow the target's argmax).

    draft_tokens: [n] nodes; draft_parents: [n] (-1: a child of the last committed
    token); target_logits: [n+1, vocab], row 0 predicts the root's children, row i+1
    the token after node i. Worked example: nodes ``a, b, c`` with parents
    ``-1, 0, -1`` and the target choosing ``a`` then ``x``: path ``[0]``, tokens ``a x``.
    """
    if target_logits.ndim != 2 or target_logits.shape[0] != len(draft_tokens) + 1:
        raise ValueError(f"target_logits must be [n+1={len(draft_tokens) + 1}, vocab], got {target_logits.shape}")
    children: dict[int, dict[int, int]] = {}  # parent -> {token: node}
    for node, (token, parent) in enumerate(zip(draft_tokens, draft_parents)):
        children.setdefault(int(parent), {}).setdefault(int(token), node)
    path: list[int] = []
    current = -1
    while True:
        y = next_token(target_logits[current + 1], params, rng)
        child = children.get(current, {}).get(y)
        if child is None:
            accepted = [int(draft_tokens[i]) for i in path]
            at_leaf = current not in children  # the walk reached the end of a branch: y is the bonus token
            return Verdict(
                tokens=accepted + [y], n_accepted=len(path), n_drafted=len(draft_tokens), bonus=at_leaf, path=path
            )
        path.append(child)
        current = child


def verify(
    draft_tokens: Sequence[int],
    draft_probs: np.ndarray | None,
    target_logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    draft_parents: Sequence[int] | None = None,
) -> Verdict:
    """Pick the lossless rule for this draft: greedy, rejection sampling, sample-and-compare, or a tree walk."""
    if draft_parents is not None:
        return verify_tree(draft_tokens, draft_parents, target_logits, params, rng)
    if params.greedy:
        return verify_greedy(draft_tokens, target_logits)
    if draft_probs is None:
        return verify_sample_and_compare(draft_tokens, target_logits, params, rng)
    return verify_rejection(draft_tokens, draft_probs, logits_to_probs(target_logits, params), rng)
