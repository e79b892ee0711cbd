"""Choose cascade configurations per budget: a 30/70 split, the cost–pass@1 Pareto front, and the comparison.

1. Split the problems about 30/70 by a seeded hash of each task id (``split``): the 30% tunes, the
   70% validates. A problem's side depends on its id alone, so a sweep that grows (a resumed
   run, more models) never moves a problem from one side to the other.
2. Evaluate every valid configuration (:func:`codeaccel.cascade.config.enumerate_configs`)
   on the tuning split; its Pareto front (no other point is at most as costly and
   strictly more accurate, or strictly cheaper and at least as accurate) is what θ
   and (k, l) are chosen from, one point per budget.
3. Evaluate every configuration on the validation split too.
4. Compare, choosing on the tuning split only and reporting what the choices do on validation: the
   best single-model point (the most accurate on tune) against the cheapest cascade point of the
   tuning front at least as accurate on tune (the cost saving), and the most accurate point of the
   tuning front that costs at most a reference point on tune (the largest model's greedy answer).
   Nothing is chosen by its validation result, so the validation figures are not selected on the
   problems they are reported on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from codeaccel.cascade.config import CascadeConfig
from codeaccel.cascade.replay import Evaluation, Replay
from codeaccel.cascade.scoring import Scorer
from codeaccel.errors import UserError

SPLIT_SEED = 0
TUNE_FRACTION = 0.3
_EPS = 1e-12


def in_tuning_split(task_id: str, seed: int = SPLIT_SEED, fraction: float = TUNE_FRACTION) -> bool:
    """Whether ``task_id`` tunes: a uniform draw from the SHA-256 of the seed and the id, below ``fraction``."""
    digest = hashlib.sha256(f"{seed}/{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(task_ids: Sequence[str], seed: int = SPLIT_SEED, fraction: float = TUNE_FRACTION) -> tuple[list, list]:
    """(tuning, validation) task ids, each sorted: :func:`in_tuning_split` per id."""
    tunes = {t: in_tuning_split(t, seed, fraction) for t in task_ids}
    return sorted(t for t, side in tunes.items() if side), sorted(t for t, side in tunes.items() if not side)


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
class Chosen:
    """A configuration chosen on the tuning split, with what it does there and on validation."""

    tune: Evaluation
    validate: Evaluation


@dataclass(frozen=True)
class Comparison:
    """The best single-model point against the cheapest cascade point at least as accurate, both chosen on
    the tuning split (None: no cascade point of the front reaches the single model's tuning accuracy)."""

    best_single: Chosen
    cascade: Chosen | None

    @property
    def saving(self) -> float | None:
        """1 - the cascade's validation cost over the single model's (negative: the cascade is dearer)."""
        if self.cascade is None:
            return None
        return 1.0 - self.cascade.validate.cost_s / self.best_single.validate.cost_s


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

    def chosen(self, on_tune: Evaluation) -> Chosen:
        """``on_tune`` with the same configuration's validation evaluation."""
        validated = next((e for e in self.validate_all if e.config == on_tune.config), None)
        if validated is None:
            raise KeyError(f"{on_tune.config.label()} was not evaluated on validation")
        return Chosen(on_tune, validated)

    def comparison(self) -> Comparison:
        """The most accurate single-model point on tune (ties: the cheaper), and the cheapest point of the
        tuning front that runs two or more stages and is at least as accurate on tune."""
        singles = [e for e in self.tune_all if e.config.single_model]
        best_single = max(singles, key=lambda e: (e.pass_at_1, -e.cost_s))
        candidates = [e for e in self.tune_front
                      if not e.config.single_model and e.pass_at_1 >= best_single.pass_at_1 - _EPS]  # fmt: skip
        cascade = min(candidates, key=lambda e: e.cost_s) if candidates else None
        return Comparison(self.chosen(best_single), self.chosen(cascade) if cascade else None)

    def best_within(self, reference: Chosen) -> Chosen | None:
        """The most accurate point of the tuning front (ties: the cheaper) costing at most ``reference`` on tune."""
        within = [e for e in self.tune_front if e.cost_s <= reference.tune.cost_s + _EPS]
        return self.chosen(max(within, key=lambda e: (e.pass_at_1, -e.cost_s))) if within else None


def tune(replay: Replay, configs: Sequence[CascadeConfig], task_ids: Sequence[str], scorer: Scorer) -> TuneResult:
    tune_ids, validate_ids = split(list(task_ids))
    if not tune_ids or not validate_ids:
        raise UserError(f"{len(task_ids)} problems leave the {'tuning' if not tune_ids else 'validation'} split "
                        "empty: replay more problems")  # fmt: skip
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
