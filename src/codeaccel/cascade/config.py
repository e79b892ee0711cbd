"""A cascade's configuration: per model (k, l), and the thresholds θ; which combinations are valid.

Per model, in cascade order (smallest first):

* k = -1: skip this model;
* k = 0: one greedy answer, no tests: the cascade stops here (stages after it never run,
  so such a configuration is refused as a duplicate of the shorter one);
* k = 1: one greedy answer and one greedy test;
* k = 3, 5, 10: k answers and k tests sampled at temperature 0.8;
* l ∈ {2, 4}: test lines asked for per test; l = 0 exactly when the model writes no
  tests (k ∈ {-1, 0}).

θ ∈ {0, 0.1, ..., 1}: one for the whole cascade (the paper) or one per model (``thetas``
per stage: our extension). The last model that runs is taken without the check, so its
θ is irrelevant: it is stored as 0.

Beyond the paper, a model may follow itself (family ``0.5B, 1.5B, 1.5B``): escalation within
one model, e.g. one greedy answer and test first, ten sampled ones only when that does not
pass. The later stage extends the earlier: what they share (the same sampled answers, tests of
the same l) is generated once, so it costs only what it adds (:func:`generations`), and it is
refused when it adds nothing. A model may not come back after another one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from codeaccel.errors import UserError

KS = (-1, 0, 1, 3, 5, 10)
LS = (0, 2, 4)
THETAS = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE_TEMPERATURE = 0.8
N_SAMPLES = max(KS)  # sampled answers and tests stored per (model, problem, l): every k reads a prefix


@dataclass(frozen=True)
class Stage:
    model: str
    k: int
    l: int  # noqa: E741 (the paper's name)

    @property
    def skipped(self) -> bool:
        return self.k == -1

    @property
    def tested(self) -> bool:
        return self.k >= 1

    @property
    def sampled(self) -> bool:
        return self.k >= 3

    def label(self) -> str:
        return f"{self.model}(k={self.k},l={self.l})" if not self.skipped else f"{self.model}(skip)"


GenerationKey = tuple[str, int, int]  # (kind "answer" or "test", l (0 for answers), sample (-1 greedy))


def answer_samples(stage: Stage) -> list[int]:
    """The samples whose answers ``stage`` reads, in order: the greedy one (-1) for k = 0 and 1, else 0..k-1."""
    if stage.skipped:
        return []
    return [-1] if stage.k in (0, 1) else list(range(stage.k))


def generations(stage: Stage) -> frozenset[GenerationKey]:
    """What ``stage`` reads from its model's generations: a later stage of the same model pays only the rest."""
    samples = answer_samples(stage)
    tests = [("test", stage.l, s) for s in samples] if stage.tested else []
    return frozenset([("answer", 0, s) for s in samples] + tests)


@dataclass(frozen=True)
class CascadeConfig:
    stages: tuple[Stage, ...]
    thetas: tuple[float, ...]  # per stage; 0 for skipped stages and for the last stage that runs

    @property
    def running(self) -> list[int]:
        """Indices of the stages that run, in order."""
        return [i for i, s in enumerate(self.stages) if not s.skipped]

    @property
    def single_model(self) -> bool:
        """One stage runs: the paper's single-model point (a model escalating within itself is not one)."""
        return len(self.running) == 1

    def earlier_of_same_model(self, i: int) -> tuple[Stage, ...]:
        """The running stages before stage ``i`` of its model, whose generations stage ``i`` reuses."""
        return tuple(self.stages[j] for j in self.running if j < i and self.stages[j].model == self.stages[i].model)

    def label(self) -> str:
        parts = []
        for i in self.running:
            stage = self.stages[i]
            last = i == self.running[-1]
            parts.append(stage.label() + ("" if last or not stage.tested else f"θ={self.thetas[i]:g}"))
        return " → ".join(parts)

    def to_record(self) -> dict:
        return {
            "stages": [{"model": s.model, "k": s.k, "l": s.l} for s in self.stages],
            "thetas": list(self.thetas),
            "label": self.label(),
        }


def check_stage(stage: Stage) -> None:
    """Refuse an invalid (k, l) with the reason."""
    if stage.k not in KS:
        raise UserError(f"{stage.model}: k must be one of {KS}, got {stage.k}")
    if stage.l not in LS:
        raise UserError(f"{stage.model}: l must be one of {LS}, got {stage.l}")
    if (stage.l == 0) != (stage.k in (-1, 0)):
        why = "a model that writes tests needs l > 0" if stage.tested else "a model without tests has l = 0"
        raise UserError(f"{stage.model}: k={stage.k} with l={stage.l}: {why}")


def make_config(stages: Sequence[Stage], thetas: Sequence[float] | float) -> CascadeConfig:
    """A valid configuration, or a :class:`UserError` saying why not."""
    stages = tuple(stages)
    if not stages:
        raise UserError("a cascade needs at least one model")
    for stage in stages:
        check_stage(stage)
    running = [i for i, s in enumerate(stages) if not s.skipped]
    if not running:
        raise UserError("every model is skipped (k=-1): at least one must answer")
    models = [s.model for s in stages]
    for i, model in enumerate(models):
        if model in models[:i] and models[i - 1] != model:
            raise UserError(f"{model} comes back after another model: a model may only follow itself")
    for i in running[:-1]:
        if stages[i].k == 0:
            raise UserError(
                f"{stages[i].model} has k=0 (answer and stop), so the models after it never run: drop them (k=-1)"
            )
    for i in running:
        before = [s for j, s in enumerate(stages) if j in running and j < i and s.model == stages[i].model]
        if before and generations(stages[i]) <= frozenset().union(*map(generations, before)):
            raise UserError(f"{stages[i].label()} after {before[-1].label()} generates nothing new: drop it (k=-1)")
    thetas = tuple([float(thetas)] * len(stages)) if isinstance(thetas, int | float) else tuple(map(float, thetas))
    if len(thetas) != len(stages):
        raise UserError(f"{len(thetas)} θ values for {len(stages)} models")
    for t in thetas:
        if not 0.0 <= t <= 1.0:
            raise UserError(f"θ must be in [0, 1], got {t}")
    # the θ that matter: of tested stages that are not last; the rest are stored as 0 (one config, one record)
    thetas = tuple(t if i in running[:-1] and stages[i].tested else 0.0 for i, t in enumerate(thetas))
    return CascadeConfig(stages=stages, thetas=thetas)


def enumerate_configs(models: Sequence[str], *, per_model_theta: bool = False) -> Iterator[CascadeConfig]:
    """Every valid, distinct configuration of ``models`` (in cascade order) over KS × LS × THETAS.

    With one θ for all stages (the paper), configurations whose θ does not matter
    (single-model ones, or none of the non-last stages tests) are yielded once.
    """
    per_stage = [[Stage(m, k, n) for k in KS for n in LS if _valid(k, n)] for m in models]
    seen: set[CascadeConfig] = set()
    for stages in itertools.product(*per_stage):
        if any(a.model == b.model and a.skipped and not b.skipped for a, b in itertools.pairwise(stages)):
            continue  # a model's skipped stages after its running ones: one configuration, one way to write it
        try:
            base = make_config(stages, 0.0)
        except UserError:
            continue
        deciding = [i for i in base.running[:-1] if stages[i].tested]
        if per_model_theta:
            grids = itertools.product(THETAS, repeat=len(deciding))
            theta_sets = [{i: t for i, t in zip(deciding, grid)} for grid in grids]
        else:
            theta_sets = [{i: t for i in deciding} for t in THETAS] if deciding else [{}]
        for chosen in theta_sets:
            config = make_config(stages, [chosen.get(i, 0.0) for i in range(len(stages))])
            if config not in seen:
                seen.add(config)
                yield config


def _valid(k: int, l: int) -> bool:  # noqa: E741
    try:
        check_stage(Stage("m", k, l))
    except UserError:
        return False
    return True
