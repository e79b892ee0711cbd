"""Which of a model's k solutions is best by its own tests, and is it good enough to stop the cascade.

Inputs are a pass matrix ``passes  # [n_solutions, n_tests] bool``: solution s passed
valid test line t (test lines that do not compile or do not call the entry point were
dropped before, :mod:`codeaccel.cascade.self_tests`). Two scorers:

* :func:`cascade_scores` (the cascade paper, Chen et al. 2024, §3.1): n_s = test lines
  solution s passes; n_t(s) = the most solutions that pass any one test line s passes
  (max over t in T_pass(s) of |{s' : s' passes t}|; 0 when s passes none); score =
  n_s · n_t(s). Its largest possible value is k · N_t (every solution passes every
  line), which :func:`accept` uses to normalise θ.
* :func:`dual_agreement_scores` (CodeT, Chen et al. 2022): solutions that pass exactly
  the same test lines form a consensus set; its score is |solutions| · |tests passed|,
  every member gets it. Its largest value is also k · N_t.

:func:`best_solution` picks the highest score; ties go to the earliest solution (the
greedy answer comes first, then samples in seed order), so the choice is
deterministic. :func:`accept`: stop at this model when best score ≥ θ · k · N_t,
where k is the number of solutions and N_t the number of valid test lines. Edge
cases, defined here and pinned by tests:

* no valid test line (N_t = 0): nothing vouches for any answer, so accept only when
  θ = 0 (θ = 0 means "always stop here"); the best is the first solution;
* every solution fails every line: all scores are 0: accepted only when θ = 0;
* k = 0 stages (one greedy answer, no tests) always accept; the last model's best is
  taken without the check (:func:`decide`, the one rule the replay and a live cascade share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from codeaccel.errors import InternalError

Scorer = Literal["cascade", "dual-agreement"]
SCORERS: tuple[Scorer, ...] = ("cascade", "dual-agreement")


def _check(passes: np.ndarray) -> np.ndarray:
    passes = np.asarray(passes, dtype=bool)
    if passes.ndim != 2 or passes.shape[0] < 1:
        raise InternalError(f"a pass matrix is [n_solutions >= 1, n_tests], got shape {passes.shape}")
    return passes


def cascade_scores(passes: np.ndarray) -> np.ndarray:
    """Score per solution  # [n_solutions] int: n_s · n_t(s) (paper §3.1)."""
    passes = _check(passes)
    n_s = passes.sum(axis=1)  # [n_solutions] test lines each solution passes
    solvers = passes.sum(axis=0)  # [n_tests] solutions passing each line
    n_t = np.where(passes, solvers[None, :], 0).max(axis=1, initial=0)  # [n_solutions]
    return (n_s * n_t).astype(np.int64)


def dual_agreement_scores(passes: np.ndarray) -> np.ndarray:
    """Score per solution  # [n_solutions] int: its consensus set's |solutions| · |tests passed| (CodeT)."""
    passes = _check(passes)
    keys = [row.tobytes() for row in passes]
    members: dict[bytes, int] = {}
    for key in keys:
        members[key] = members.get(key, 0) + 1
    return np.array([members[key] * int(row.sum()) for key, row in zip(keys, passes)], dtype=np.int64)


def scores(passes: np.ndarray, scorer: Scorer) -> np.ndarray:
    if scorer == "cascade":
        return cascade_scores(passes)
    if scorer == "dual-agreement":
        return dual_agreement_scores(passes)
    raise InternalError(f"unknown scorer {scorer!r}")


@dataclass(frozen=True)
class Verdict:
    best: int  # index of the chosen solution
    score: int  # its score
    max_score: int  # k · N_t: the score if every solution passed every line
    accepted: bool  # stop here (score >= θ · max_score, see the module's edge cases)


def best_solution(score: np.ndarray) -> int:
    """The highest-scoring solution; ties go to the earliest."""
    return int(np.argmax(score))  # argmax returns the first of equal maxima


def accept(passes: np.ndarray, theta: float, scorer: Scorer = "cascade") -> Verdict:
    """Pick this model's best solution and decide whether the cascade stops at it."""
    if not 0.0 <= theta <= 1.0:
        raise InternalError(f"θ must be in [0, 1], got {theta}")
    passes = _check(passes)
    k, n_tests = passes.shape
    score = scores(passes, scorer)
    best = best_solution(score)
    max_score = k * n_tests
    if theta == 0.0:
        accepted = True
    elif n_tests == 0:
        accepted = False
    else:
        accepted = bool(score[best] >= theta * max_score - 1e-9)  # 0.3 * 10 is 3.0000000000000004
    return Verdict(best=best, score=int(score[best]), max_score=max_score, accepted=accepted)


Decision = Literal["k=0", "last", "accepted", "escalated"]


def decide(k: int, last: bool, verdict: Verdict | None) -> Decision:
    """Whether a running stage answers (paper §3.1): a k = 0 stage always does (its greedy answer, untested),
    the last running stage always does (its best without the check), any other when its verdict accepts
    (``verdict`` may be None only for those two, which need none)."""
    if k == 0:
        return "k=0"
    if last:
        return "last"
    if verdict is None:
        raise InternalError("a tested stage that is not the last needs its verdict")
    return "accepted" if verdict.accepted else "escalated"
