"""A cascade configuration replayed over the generation store: per problem, which answer, passed or not, at what cost.

Nothing is generated here. For each model and problem a stage (k, l) reads:

* k = 0: the greedy answer; no tests; it always stops the cascade;
* k = 1: the greedy answer and the greedy test asked for l lines;
* k ≥ 3: sampled answers 0..k-1 and sampled tests 0..k-1 asked for l lines.

Its test lines are the distinct lines extracted from those tests (N_t of them; a replay may
leave some out, e.g. the lines repeating an official test the prompt showed: ``keep_line``), its
pass matrix comes from the stored line results, and :func:`codeaccel.cascade.scoring.accept`
picks the best answer and decides. Stages run in order until one accepts; the last
that runs is taken without the check. A problem's cost is the sum over the stages that
ran of their generation (each decode step at the measured cost of the batch still running,
:mod:`codeaccel.cascade.cost`) and their prompts' prefill, which is also kept apart. A stage
that follows a stage of its own model pays only for the generations that one did not make
(:func:`codeaccel.cascade.config.generations`; they decode together as one batch); the prompts
it generates from are counted again (conservative: a server might still hold them in its cache),
a prompt it generates nothing from (its answers', where it only adds tests) is not evaluated at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.cascade.config import CascadeConfig, Stage, answer_samples, generations
from codeaccel.cascade.cost import generation_seconds, scaled, spent_scale
from codeaccel.cascade.endpoint import is_endpoint_name
from codeaccel.cascade.scoring import Scorer, Verdict, accept, decide
from codeaccel.cascade.store import BatchCost, GenerationStore, StoredGeneration
from codeaccel.errors import InternalError, UserError


@dataclass(frozen=True)
class StageData:
    """One model's stored answers and tests for one problem, ready for every (k, l)."""

    answers: dict[int, StoredGeneration]  # sample (-1 greedy) -> answer
    tests: dict[tuple[int, int], StoredGeneration]  # (l, sample) -> test
    answer_passed: dict[int, bool]  # answer id -> passes the official tests
    test_lines: dict[int, list[tuple[str, bool]]]  # test id -> [(line, reference passes it)]
    line_passed: dict[int, dict[str, bool]]  # answer id -> line -> passes


@dataclass(frozen=True)
class StageRun:
    """What one stage does on one problem (independent of θ, except through ``verdict.accepted``)."""

    answer_ids: tuple[int, ...]
    lines: tuple[str, ...]  # N_t distinct test lines
    passes: np.ndarray  # [k, N_t] bool
    chosen_passed_at: dict[Scorer, tuple[int, bool]]  # scorer -> (best index, its official result)
    gen_tokens: int
    prompt_tokens: int
    n_sequences: int
    gen_s: float
    prompt_s: float


@dataclass(frozen=True)
class Added:
    """What a stage pays on one problem: its generations and prompts that an earlier stage of its model did not."""

    gen_s: float
    gen_tokens: int
    prompt_s: float
    prompt_tokens: int


@dataclass(frozen=True)
class ProblemOutcome:
    task_id: str
    passed: bool
    stopped_at: int  # index of the stage whose answer was taken
    cost_s: float  # generation + prefill
    prompt_s: float  # of which prefill
    gen_tokens: int
    prompt_tokens: int


class Replay:
    """Replays configurations over one dataset of a store; stage runs are cached across configurations."""

    def __init__(self, store: GenerationStore, dataset: str, task_ids: Sequence[str], n_seq_max: int = 16,
                 keep_line: Callable[[str, str], bool] | None = None, calibrate: bool = False):  # fmt: skip
        """``keep_line(task_id, line)``: whether a stored test line counts as the model's own test (None: all do).
        ``calibrate``: each local model's measured costs scaled to what the sweep spent (``cost.spent_scale``)."""
        self.store = store
        self.dataset = dataset
        self.task_ids = list(task_ids)
        self.n_seq_max = n_seq_max
        self.keep_line = keep_line
        self.calibrate = calibrate
        self._scales: dict[str, float] = {}  # model -> the factor its measured costs were scaled by
        self._costs: dict[str, dict[int, BatchCost]] = {}

    def costs(self, model: str) -> dict[int, BatchCost]:
        if model not in self._costs:
            costs = self.store.batch_costs(model)
            if not costs:
                raise UserError(f"{self.store.path} has no measured batch costs for {model}: run `cascade run` first")
            scale = 1.0  # an endpoint's costs are measured as a client sees them, its whole answer at a time
            if self.calibrate and not is_endpoint_name(model):
                scale = spent_scale(costs, self.store.spend(model, self.dataset))
            self._scales[model] = scale
            self._costs[model] = scaled(costs, scale)
            cpus = {c.cpu for m, cs in self._costs.items() if not is_endpoint_name(m) for c in cs.values()}
            if len(cpus) > 1:  # an endpoint's cost is its own machine's by design; local models' must share one
                del self._costs[model]
                self._scales.pop(model, None)
                raise UserError(f"{self.store.path}: the local models' batch costs were measured on different CPUs "
                                f"({'; '.join(sorted(cpus))}), and costs compare only within one machine: run "
                                "`cascade run` with the same settings and --remeasure-costs on one (for a store "
                                "made with --answers-from: on its source, then copy again)")  # fmt: skip
        return self._costs[model]

    def cost_scale(self, model: str) -> float:
        """The factor ``model``'s measured costs are scaled by in this replay (1: as measured)."""
        self.costs(model)
        return self._scales[model]

    @functools.lru_cache(maxsize=None)  # noqa: B019 (the replay lives as long as its caches should)
    def data(self, model: str, task_id: str) -> StageData:
        gens = self.store.generations(model, self.dataset, task_id)
        if not gens:
            raise UserError(f"{model} has nothing stored for {task_id}: run `cascade run` for it first")
        answers = {g.sample: g for g in gens if g.kind == "answer"}
        tests = {(g.l, g.sample): g for g in gens if g.kind == "test"}
        answer_ids = [g.id for g in answers.values()]
        passed = self.store.answer_results(answer_ids)
        if len(passed) < len(answer_ids):
            raise UserError(f"{model} / {task_id} is generated but not executed: run `cascade run` to finish it")
        return StageData(
            answers=answers,
            tests=tests,
            answer_passed=passed,
            test_lines=self.store.test_lines(g.id for g in tests.values()),
            line_passed=self.store.line_results(answer_ids),
        )

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def stage_run(self, stage: Stage, task_id: str) -> StageRun:
        d = self.data(stage.model, task_id)
        samples = answer_samples(stage)
        missing = [s for s in samples if s not in d.answers]
        if missing:
            raise UserError(f"{stage.model} / {task_id} has no stored answer sample {missing[0]} (k={stage.k})")
        answers = [d.answers[s] for s in samples]
        if stage.tested and any((stage.l, s) not in d.tests for s in samples):
            raise UserError(f"{stage.model} / {task_id} lacks stored tests for l={stage.l}, k={stage.k}")
        tests = [d.tests[(stage.l, s)] for s in samples] if stage.tested else []
        lines = tuple(dict.fromkeys(line for t in tests for line, _ in d.test_lines[t.id]
                                    if self.keep_line is None or self.keep_line(task_id, line)))  # fmt: skip
        passes = np.array(
            [[d.line_passed[a.id].get(line, False) for line in lines] for a in answers], dtype=bool
        ).reshape(len(answers), len(lines))
        chosen = {}
        for scorer in ("cascade", "dual-agreement"):
            verdict = accept(passes, 0.0, scorer)
            chosen[scorer] = (verdict.best, d.answer_passed[answers[verdict.best].id])
        gen_tokens = sum(g.tokens for g in answers + tests)
        n_sequences = len(answers) + len(tests)
        prompt_tokens = answers[0].prompt_tokens + (tests[0].prompt_tokens if tests else 0)  # shared by copies
        costs = self.costs(stage.model)
        s_prompt = min(c.s_per_prompt_token for c in costs.values())
        return StageRun(
            answer_ids=tuple(a.id for a in answers),
            lines=lines,
            passes=passes,
            chosen_passed_at=chosen,
            gen_tokens=gen_tokens,
            prompt_tokens=prompt_tokens,
            n_sequences=n_sequences,
            gen_s=generation_seconds(costs, [g.tokens for g in answers + tests], self.n_seq_max),
            prompt_s=prompt_tokens * s_prompt,
        )

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def added(self, stage: Stage, earlier: tuple[Stage, ...], task_id: str) -> Added:
        """What ``stage`` costs after the ``earlier`` stages of its model: only the generations they did not
        make, decoded together, and the prompts of those (one per kind: its answers', its tests')."""
        run = self.stage_run(stage, task_id)
        if not earlier:
            return Added(run.gen_s, run.gen_tokens, run.prompt_s, run.prompt_tokens)
        d = self.data(stage.model, task_id)
        made = frozenset().union(*map(generations, earlier))
        new = [d.answers[s] if kind == "answer" else d.tests[(n_lines, s)]
               for kind, n_lines, s in sorted(generations(stage) - made)]  # fmt: skip
        lengths = [g.tokens for g in new]
        prompt_tokens = sum({g.kind: g.prompt_tokens for g in new}.values())  # a kind's copies share one prompt
        s_prompt = min(c.s_per_prompt_token for c in self.costs(stage.model).values())
        gen_s = generation_seconds(self.costs(stage.model), lengths, self.n_seq_max)
        return Added(gen_s, sum(lengths), prompt_tokens * s_prompt, prompt_tokens)

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def verdict(self, stage: Stage, task_id: str, theta: float, scorer: Scorer) -> Verdict:
        return accept(self.stage_run(stage, task_id).passes, theta, scorer)

    def outcome(self, config: CascadeConfig, task_id: str, scorer: Scorer = "cascade") -> ProblemOutcome:
        cost = prompt = 0.0
        gen_tokens = prompt_tokens = 0
        running = config.running
        for i in running:
            stage = config.stages[i]
            run = self.stage_run(stage, task_id)
            paid = self.added(stage, config.earlier_of_same_model(i), task_id)
            cost += paid.gen_s + paid.prompt_s
            prompt += paid.prompt_s
            gen_tokens += paid.gen_tokens
            prompt_tokens += paid.prompt_tokens
            last = i == running[-1]
            verdict = None if last or stage.k == 0 else self.verdict(stage, task_id, config.thetas[i], scorer)
            if decide(stage.k, last, verdict) != "escalated":
                _, passed = run.chosen_passed_at[scorer]
                return ProblemOutcome(task_id, passed, i, cost, prompt, gen_tokens, prompt_tokens)
        raise InternalError(f"{config.label()}: no stage answered (the last running stage always does)")

    def any_passes(self, model: str, k: int, task_ids: Sequence[str]) -> float:
        """Share of problems where one of ``model``'s sampled answers 0..k-1 passes the official tests: the
        pass@1 a perfect selector among them would reach (what self-tests leave on the table)."""
        hits = 0
        for task_id in task_ids:
            d = self.data(model, task_id)
            hits += any(d.answer_passed[d.answers[s].id] for s in range(k) if s in d.answers)
        return hits / len(task_ids) if task_ids else 0.0

    def evaluate(self, config: CascadeConfig, task_ids: Sequence[str], scorer: Scorer = "cascade") -> Evaluation:
        outcomes = [self.outcome(config, t, scorer) for t in task_ids]
        return Evaluation(config, scorer, outcomes)


@dataclass(frozen=True)
class Evaluation:
    config: CascadeConfig
    scorer: Scorer
    outcomes: list[ProblemOutcome]

    @property
    def n_problems(self) -> int:
        return len(self.outcomes)

    def _mean(self, field: str) -> float:
        """The mean over problems of one ProblemOutcome field (0 for no problems)."""
        return float(np.mean([getattr(o, field) for o in self.outcomes])) if self.outcomes else 0.0

    @property
    def pass_at_1(self) -> float:
        return self._mean("passed")

    @property
    def cost_s(self) -> float:
        """Mean engine seconds per problem (generation + prefill)."""
        return self._mean("cost_s")

    @property
    def prompt_s(self) -> float:
        return self._mean("prompt_s")

    @property
    def gen_tokens(self) -> float:
        return self._mean("gen_tokens")

    @property
    def prompt_tokens(self) -> float:
        """Mean prompt tokens evaluated per problem (prefill, apart from the generated tokens)."""
        return self._mean("prompt_tokens")

    def stopped_at(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for o in self.outcomes:
            out[o.stopped_at] = out.get(o.stopped_at, 0) + 1
        return out
