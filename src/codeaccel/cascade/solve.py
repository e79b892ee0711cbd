"""A chosen configuration put to work: one problem answered live, stage by stage.

``cascade tune`` chooses (k, l, θ) per budget from stored generations; this runs one. Each
running stage generates only what it reads and its model has not generated yet for the
problem (:func:`codeaccel.cascade.config.generations`: a model that follows itself extends
its earlier stage), batched on the model's sequence set with the sweep's own prompts,
sampling and seeds (:func:`codeaccel.cascade.generation.generate_problems`): a live answer
is the stored one up to the float noise of another batch shape. Its answers run against its test lines in the
sandbox, :func:`codeaccel.cascade.scoring.accept` picks the best and decides, and the last
stage that runs answers without the check.

A stage may be an OpenAI-compatible endpoint (``openai:MODEL@URL``): it is asked, with the sweep's
chat prompts, sampling and seeds, only the answers and tests the stage reads.

:func:`choose_tuned` reads a ``cascade tune`` report and picks the configuration for a budget:
of the points of the tuning front, the most accurate on the tuning split whose cost there is
within it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codeaccel.cascade.config import (
    N_SAMPLES,
    CascadeConfig,
    GenerationKey,
    Stage,
    answer_samples,
    generations,
    make_config,
)
from codeaccel.cascade.endpoint import EndpointStage, parse_endpoint
from codeaccel.cascade.generation import TEST_LS, TOP_P, GenerationSettings, generate_problems
from codeaccel.cascade.problems import CascadeProblem
from codeaccel.cascade.scoring import SCORERS, Decision, Scorer, Verdict, accept, decide
from codeaccel.cascade.self_tests import (
    SHOWN_TESTS,
    TEST_FORMATS,
    SelfTestFormat,
    extract_test_lines,
    repeats_shown_test,
)
from codeaccel.cascade.store import StoredGeneration
from codeaccel.engines import ENGINES, Engine, SequenceSet, load_engine, open_sequences
from codeaccel.errors import InternalError, UserError
from codeaccel.models.registry import canonical_name
from codeaccel.sandbox import Job, Limits, SandboxPool

Progress = Callable[[str], None]
CACHE_CELLS = 24576  # all sequences together: a stage's prompts and 20 sequences of 512 tokens fit with room


@dataclass(frozen=True)
class StageOutcome:
    stage: Stage
    verdict: Verdict | None  # None where nothing is checked: k = 0
    n_answers: int
    n_lines: int  # N_t: the distinct test lines its tests gave
    generated_tokens: int  # what it generated (not what an earlier stage of its model did)
    seconds: float  # wall: generation and execution
    decided: Decision  # "accepted", "escalated", "k=0" or "last"


@dataclass(frozen=True)
class Solution:
    task_id: str
    completion: str  # the chosen answer as the model wrote it after the started code
    code: str  # the started code and the completion: the whole function
    answered_by: int  # the stage index whose answer this is
    stages: tuple[StageOutcome, ...]
    seconds: float
    official_passed: bool | None  # the benchmark's own tests, where the problem has them

    def to_record(self) -> dict:
        return {
            "task_id": self.task_id,
            "code": self.code,
            "answered_by": self.stages[-1].stage.label(),
            "official_passed": self.official_passed,
            "seconds": round(self.seconds, 3),
            "stages": [
                {
                    "stage": o.stage.label(),
                    "decided": o.decided,
                    "score": None if o.verdict is None else o.verdict.score,
                    "max_score": None if o.verdict is None else o.verdict.max_score,
                    "answers": o.n_answers,
                    "test_lines": o.n_lines,
                    "generated_tokens": o.generated_tokens,
                    "seconds": round(o.seconds, 3),
                }
                for o in self.stages
            ],
        }


class CascadeSolver:
    """Answers problems with one configuration: each model loaded once (on first use), one sandbox pool."""

    def __init__(self, config: CascadeConfig, *, engine: str = "llama.cpp", scorer: Scorer = "cascade",
                 n_seq_max: int = 24, max_tokens: int = 512, test_format: SelfTestFormat = "chat",
                 limits: Limits | None = None, shown_tests: str = "exclude"):  # fmt: skip
        """``shown_tests``: ``exclude`` leaves out test lines repeating an official test the prompt showed
        (only a benchmark's problem has any), as ``cascade tune`` does by default; ``keep`` counts them."""
        if test_format != "chat" and any(parse_endpoint(config.stages[i].model) for i in config.running):
            raise UserError("an endpoint stage asks for its tests in the chat format: use test format chat")
        self.config = config
        self.engine_kind = engine
        self.scorer: Scorer = scorer
        self.shown_tests = shown_tests
        self.settings = GenerationSettings(N_SAMPLES, max_tokens, test_format, n_seq_max)
        self.limits = limits or Limits(timeout_s=10.0, line_timeout_s=2.0)
        self._models: dict[str, tuple[Engine, SequenceSet]] = {}
        self._endpoints: dict[str, EndpointStage] = {}  # a black-box stage's connection, checked once
        self._pool = SandboxPool()

    def __enter__(self) -> CascadeSolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Frees every model and the sandbox pool, each even where freeing another failed."""
        models, self._models = list(self._models.values()), {}
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        with contextlib.ExitStack() as stack:  # unwinds in reverse: the models' sequences first, the pool last
            stack.callback(self._pool.close)
            for stage in endpoints:
                stack.callback(stage.close)
            for engine, seqs in models:
                stack.callback(engine.close)
                stack.callback(seqs.free)

    def _endpoint(self, spec: str) -> EndpointStage:
        if spec not in self._endpoints:
            endpoint = parse_endpoint(spec)
            if endpoint is None:
                raise InternalError(f"{spec} is no endpoint")
            stage = EndpointStage(endpoint)
            try:
                stage.check()  # unreachable, or not serving the model: refused before anything is asked
            except BaseException:
                stage.close(aborted=True)
                raise
            self._endpoints[spec] = stage
        return self._endpoints[spec]

    def _model(self, name: str) -> tuple[Engine, SequenceSet]:
        if name not in self._models:
            engine = load_engine(name, self.engine_kind, n_ctx=4096)
            try:
                seqs = open_sequences(engine, n_seq_max=self.settings.n_seq_max, n_ctx=CACHE_CELLS)
            except BaseException:
                engine.close()
                raise
            self._models[name] = (engine, seqs)
        return self._models[name]

    def solve(self, cp: CascadeProblem, progress: Progress | None = None) -> Solution:
        say = progress or (lambda _: None)
        t_start = time.perf_counter()
        made: dict[str, dict[GenerationKey, StoredGeneration]] = {}  # model -> what it generated here
        line_passed: dict[tuple[str, int], dict[str, bool]] = {}  # (model, answer sample) -> line -> passes
        outcomes: list[StageOutcome] = []
        running = self.config.running
        for i in running:
            stage = self.config.stages[i]
            have = made.setdefault(stage.model, {})
            want = generations(stage) - have.keys()
            if want and parse_endpoint(stage.model):
                self._endpoint(stage.model)  # connected and checked once, outside the stage's time
            elif want:
                self._model(stage.model)  # loaded once, outside the stage's time
            t0 = time.perf_counter()
            say(f"{stage.label()}: generating {len(want)} sequences")
            new = self._generate(stage.model, cp, frozenset(want))
            have.update(new)
            samples = answer_samples(stage)
            answers = [have[("answer", 0, s)] for s in samples]
            tests = [have[("test", stage.l, s)] for s in samples] if stage.tested else []
            lines = list(dict.fromkeys(line for t in tests for line in extract_test_lines(t.text, cp.entry_point, t.l)
                                       if self.shown_tests == "keep" or not repeats_shown_test(line, cp)))  # fmt: skip
            if lines:
                say(f"{stage.label()}: running {len(answers)} answers against {len(lines)} test lines")
            self._execute(cp, stage.model, samples, answers, lines, line_passed)
            passes = np.array([[line_passed[(stage.model, s)][line] for line in lines] for s in samples], dtype=bool)
            passes = passes.reshape(len(samples), len(lines))
            last = i == running[-1]
            verdict = accept(passes, self.config.thetas[i], self.scorer) if stage.tested else None
            decided = decide(stage.k, last, verdict)
            outcomes.append(StageOutcome(stage, verdict, len(answers), len(lines), sum(g.tokens for g in new.values()),
                                         time.perf_counter() - t0, decided))  # fmt: skip
            if decided != "escalated":
                chosen = answers[verdict.best if verdict is not None else 0]
                return Solution(
                    task_id=cp.task_id,
                    completion=chosen.text,
                    code=cp.problem.code_prefix + chosen.text + "\n",
                    answered_by=i,
                    stages=tuple(outcomes),
                    seconds=time.perf_counter() - t_start,
                    official_passed=self._official(cp, chosen.text),
                )
        raise InternalError(f"{self.config.label()}: no stage answered (the last running stage always does)")

    def _generate(self, model: str, cp: CascadeProblem, want: frozenset[GenerationKey]) -> dict:
        if not want:
            return {}
        rows: list[StoredGeneration] = []
        if parse_endpoint(model):  # the sweep's chat requests, sampling and seeds, asked of the endpoint
            settings = self.settings
            rows = self._endpoint(model).generate(cp, settings.n_samples, TEST_LS, settings.max_tokens, TOP_P, want)
            return self._keyed(model, cp, rows, want)
        engine, seqs = self._model(model)
        try:
            generate_problems(engine, seqs, [cp], self.settings, lambda _, got: rows.extend(got), only=want)
        except BaseException:  # an error or Ctrl-C mid-decode: the next problem starts on no open sequence
            seqs.close_all()
            raise
        return self._keyed(model, cp, rows, want)

    @staticmethod
    def _keyed(model: str, cp: CascadeProblem, rows: list[StoredGeneration], want: frozenset[GenerationKey]) -> dict:
        got = {(g.kind, g.l, g.sample): g for g in rows}
        if got.keys() != want:
            raise InternalError(f"{model} generated {sorted(got)} for {cp.task_id}, asked {sorted(want)}")
        return got

    def _execute(self, cp: CascadeProblem, model: str, samples: list[int], answers: list[StoredGeneration],
                 lines: list[str], line_passed: dict[tuple[str, int], dict[str, bool]]) -> None:  # fmt: skip
        """Every answer against the lines it has not run yet (an earlier stage of its model ran the rest)."""
        jobs, owners = [], []
        for s, a in zip(samples, answers):
            known = line_passed.setdefault((model, s), {})
            todo = [line for line in lines if line not in known]
            if todo:
                jobs.append(Job(cp.problem.code_prefix + a.text + "\n", todo, self.limits))
                owners.append((known, todo))
        for (known, todo), result in zip(owners, self._pool.map_every_line(jobs)):
            known.update({line: t.status == "passed" for line, t in zip(todo, result.tests)})

    def _official(self, cp: CascadeProblem, completion: str) -> bool | None:
        if not cp.problem.tests:
            return None
        (result,) = self._pool.map([Job(cp.problem.solution(completion), cp.problem.tests, self.limits)])
        return result.passed


def parse_stages(spec: str, thetas: str) -> CascadeConfig:
    """``model:k:l`` stages, comma-separated, smallest first, and θ (one, or one per stage)."""
    stages = []
    for item in spec.split(","):
        parts = item.strip().rsplit(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise UserError(f"--stages: each stage is MODEL:K:L (e.g. qwen2.5-coder-0.5b-instruct:3:2), got {item!r}")
        try:
            # an alias is its model's name: "1.5b" then "qwen2.5-coder-1.5b-instruct" is one model following itself
            stages.append(Stage(canonical_name(parts[0].strip()), int(parts[1]), int(parts[2])))
        except ValueError:
            raise UserError(f"--stages: k and l are integers, got {item!r}") from None
    try:
        values = [float(t) for t in thetas.split(",")]
    except ValueError:
        raise UserError(f"--theta takes one number or one per stage, comma-separated, got {thetas!r}") from None
    return make_config(stages, values[0] if len(values) == 1 else values)


@dataclass(frozen=True)
class TunedPoint:
    """A report's chosen configuration, with what the replay counted it under."""

    config: CascadeConfig
    row: dict  # its validation row; ``scorer`` is the one θ was tuned for
    test_format: SelfTestFormat  # how the sweep asked for tests, and the answers' token limit
    max_tokens: int
    engine: str
    shown_tests: str  # whether the replay left out test lines repeating a shown official test


def choose_tuned(report: Path, budget_usd: float | None) -> TunedPoint:
    """The configuration a ``cascade tune`` report chose for ``budget_usd`` per problem (None: the most
    accurate): among the points of its tuning front, the most accurate on the tuning split whose cost there
    is within the budget (ties: the cheaper), as the tuner chooses; with its validation row and the sweep's
    generation settings (a report written before they were recorded: the defaults of ``cascade run``, chat
    tests and 512 tokens on llama.cpp)."""
    try:
        doc = json.loads(report.read_text())
        generation = doc.get("generation", {"test_format": "chat", "max_tokens": 512, "engine": "llama.cpp"})
        test_format, engine = generation["test_format"], generation["engine"]
        max_tokens = int(_number(generation["max_tokens"]))
        if test_format not in TEST_FORMATS or engine not in ENGINES or max_tokens < 1:
            raise ValueError(f"generation settings {generation}")
        shown_tests = doc.get("config", {}).get("shown_tests", "keep")  # reports before the setting kept them all
        if shown_tests not in SHOWN_TESTS:
            raise ValueError(f"shown_tests {shown_tests!r}")
        rows = doc["rows"]
        validated = {r["config"]["label"]: r for r in rows if r["split"] == "validate"}
        points = [(_number(r["pass_at_1"]), _number(r["cost_usd"]), validated[r["config"]["label"]])
                  for r in rows if r["split"] == "tune" and r["config"]["label"] in validated]  # fmt: skip
        if any(r["scorer"] not in SCORERS for _, _, r in points):
            raise ValueError("an unknown scorer")
    except FileNotFoundError:
        raise UserError(f"--tuned: no such report {report}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--tuned: {report} is not a `cascade tune` JSON report ({type(exc).__name__})") from None
    if not points:
        raise UserError(f"--tuned: {report} holds no chosen point validated: run `cascade tune` again")
    within = [p for p in points if budget_usd is None or p[1] <= budget_usd]
    if not within:
        cheapest = min(cost for _, cost, _ in points)
        raise UserError(
            f"--budget {budget_usd}: no chosen point costs that little (the cheapest: ${cheapest} per problem "
            "on the tuning split)"
        )
    best = max(within, key=lambda p: (p[0], -p[1]))[2]
    record = best["config"]
    specs = doc.get("models", {})  # stored name -> what to load (a GGUF's path; reports before it: the names)
    try:
        stages = [Stage(_spec(specs, s["model"]), int(s["k"]), int(s["l"])) for s in record["stages"]]
        config = make_config(stages, [float(t) for t in record["thetas"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--tuned: {report} holds a configuration this version cannot read ({exc})") from None
    return TunedPoint(config, best, test_format, max_tokens, engine, shown_tests)


def _spec(specs: object, name: str) -> str:
    spec = specs.get(name, name) if isinstance(specs, dict) else name
    if not isinstance(spec, str):
        raise TypeError(f"model {name!r} recorded as {spec!r}")
    return spec


def _number(value: object) -> float:
    """A report's number (a bool, None or text is no number: the report is not one ``cascade tune`` wrote)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)
