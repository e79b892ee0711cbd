"""Choose cascade configurations per budget: a 30/70 split, the cost–pass@1 Pareto front, and the comparison.

1. Split the problems 30/70 with a fixed seed (``split``): the 30% tunes, the 70% validates.
2. Evaluate every valid configuration (:func:`codeaccel.cascade.config.enumerate_configs`)
   on the tuning split; its Pareto front (no other point is at most as costly and
   strictly more accurate, or strictly cheaper and at least as accurate) is what θ
   and (k, l) are chosen from, one point per budget.
3. Evaluate the front's configurations on the validation split, and the same for the
   single-model configurations (one model, its own k, l and self-test selection).
4. Report on validation: the cost saving at the accuracy of the best single-model
   point, and the best accuracy at or below the cost of a reference point (the
   largest model's greedy answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.cascade.config import CascadeConfig
from codeaccel.cascade.replay import Evaluation, Replay
from codeaccel.cascade.scoring import Scorer

SPLIT_SEED = 0
TUNE_FRACTION = 0.3


def split(task_ids: Sequence[str], seed: int = SPLIT_SEED, fraction: float = TUNE_FRACTION) -> tuple[list, list]:
    """(tuning, validation) task ids: a seeded permutation, the first ``fraction`` of it tunes."""
    order = np.random.default_rng(seed).permutation(len(task_ids))
    n_tune = round(fraction * len(task_ids))
    tune = sorted(task_ids[i] for i in order[:n_tune])
    validate = sorted(task_ids[i] for i in order[n_tune:])
    return tune, validate


def pareto_front(points: Sequence[Evaluation]) -> list[Evaluation]:
    """The non-dominated points by (lower mean cost, higher pass@1), cheapest first.

    Among points of equal cost and accuracy the first given is kept (configurations are
    enumerated in a fixed order, so the front is deterministic).
    """
    ordered = sorted(enumerate(points), key=lambda ip: (ip[1].cost_s, -ip[1].pass_at_1, ip[0]))
    front: list[Evaluation] = []
    best = -1.0
    for _, point in ordered:
        if point.pass_at_1 > best + 1e-12:
            front.append(point)
            best = point.pass_at_1
    return front


@dataclass(frozen=True)
class TuneResult:
    scorer: Scorer
    tune_ids: list[str]
    validate_ids: list[str]
    tune_all: list[Evaluation]  # every configuration on the tuning split
    tune_front: list[Evaluation]  # cascade (any configuration) front on the tuning split
    tune_single_front: list[Evaluation]  # single-model front on the tuning split
    validate_front: list[Evaluation]  # the tuning front's configurations on validation
    validate_single: list[Evaluation]  # every single-model configuration on validation
    validate_all: list[Evaluation]  # every configuration on validation (for the plot)

    def saving_at_best_single(self) -> dict | None:
        """On validation: the cheapest chosen cascade point (two or more stages run) at least as accurate as the
        best single-model point (the most accurate on validation itself: the bar a cascade must clear is the
        single model at its best, not as chosen on the tuning split)."""
        best_single = max(self.validate_single, key=lambda e: (e.pass_at_1, -e.cost_s))
        candidates = [e for e in self.validate_front
                      if not e.config.single_model and e.pass_at_1 >= best_single.pass_at_1 - 1e-12]  # fmt: skip
        if not candidates:
            return {"best_single": best_single, "cascade": None, "saving": None}
        cheapest = min(candidates, key=lambda e: e.cost_s)
        return {"best_single": best_single, "cascade": cheapest, "saving": 1.0 - cheapest.cost_s / best_single.cost_s}

    def best_within(self, reference: Evaluation) -> Evaluation | None:
        """On validation: the most accurate chosen cascade point costing at most ``reference``."""
        within = [e for e in self.validate_front if e.cost_s <= reference.cost_s + 1e-12]
        return max(within, key=lambda e: (e.pass_at_1, -e.cost_s)) if within else None


def tune(replay: Replay, configs: Sequence[CascadeConfig], task_ids: Sequence[str], scorer: Scorer) -> TuneResult:
    tune_ids, validate_ids = split(list(task_ids))
    tune_all = [replay.evaluate(c, tune_ids, scorer) for c in configs]
    front = pareto_front(tune_all)
    single_front = pareto_front([e for e in tune_all if e.config.single_model])
    validate_all = [replay.evaluate(c, validate_ids, scorer) for c in configs]
    by_config = {e.config: e for e in validate_all}
    return TuneResult(
        scorer=scorer,
        tune_ids=tune_ids,
        validate_ids=validate_ids,
        tune_all=tune_all,
        tune_front=front,
        tune_single_front=single_front,
        validate_front=[by_config[e.config] for e in front],
        validate_single=[e for e in validate_all if e.config.single_model],
        validate_all=validate_all,
    )
