"""``codeaccel cascade run``: generate every answer and test a sweep can use, execute them, store it all.

Per model, one batched decoder runs the problems back to back
(:func:`~codeaccel.cascade.generation.generate_problems`), decoding per problem the greedy
answer, a greedy test per l, ``N_SAMPLES`` sampled answers and ``N_SAMPLES`` sampled tests
per l (temperature 0.8, top-p 0.95, seed = sample index), so every (k, l) of the sweep reads
a prefix of what is stored: k = 3 uses samples 0..2.
Each problem is executed in the sandbox as soon as its generations are stored (one execution
per answer: every distinct test line of its model and problem, each reported on its own), so
an interrupted sweep can be replayed on every problem it generated:

* each answer against the dataset's official tests (pass@1's ground truth);
* each answer against the test lines (the pass matrix the scorers read);
* the dataset's reference solution against the test lines (their validity).

A problem's generations for one model are written in one transaction, its executions in
another, so Ctrl-C loses at most the problems in progress and a rerun skips what is
stored. Batch costs (seconds per token at each batch size) are measured once per model
and stored (:mod:`codeaccel.cascade.cost`), every local model's before any generation: a
sweep that outlives a session may resume on another machine, and its costs must still
compare within one (``remeasure_costs`` measures them all again, here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from codeaccel import machine
from codeaccel.cascade.config import N_SAMPLES, SAMPLE_TEMPERATURE
from codeaccel.cascade.cost import measure_batch_costs
from codeaccel.cascade.endpoint import EndpointStage, parse_endpoint, stage_name
from codeaccel.cascade.generation import TEST_LS, TOP_P, GenerationSettings, generate_problems
from codeaccel.cascade.problems import CascadeProblem, load_cascade_problems
from codeaccel.cascade.self_tests import SelfTestFormat, extract_test_lines
from codeaccel.cascade.store import GenerationStore, StoredGeneration
from codeaccel.engines import load_engine, open_sequences
from codeaccel.errors import UserError
from codeaccel.sandbox import Job, Limits, SandboxPool
from codeaccel.sandbox.execution import RULES_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    models: tuple[str, ...]  # cascade order, smallest first
    dataset: str
    engine: str = "llama.cpp"
    limit: int | None = None
    test_format: SelfTestFormat = "chat"
    max_tokens: int = 512  # per answer
    n_samples: int = N_SAMPLES
    # all of a problem's sequences at once, (1 + n_samples) × (1 + len(TEST_LS)) = 33: on the AMD EPYC VM
    # (0.5B, HumanEval/130) 72.9 tok/s against 48.8 with 16 at once (runs before 2026-12-06 used 16)
    n_seq_max: int = (1 + N_SAMPLES) * (1 + len(TEST_LS))
    n_ctx: int = 24576  # cache cells, all sequences together (3 prompts + 33 × 512 tokens fit with room)
    test_timeout_s: float = 10.0
    # another store whose answers (and batch costs) are taken instead of generated: only tests are generated,
    # so two self-test formats are compared on the very same answers
    answers_from: str | None = None
    remeasure_costs: bool = False  # measure every local model's batch costs again, on this machine
    re_execute: bool = False  # drop every stored execution result and execute the stored generations again

    @property
    def generation(self) -> GenerationSettings:
        return GenerationSettings(self.n_samples, self.max_tokens, self.test_format, self.n_seq_max)

    def to_record(self) -> dict:
        return {
            "models": list(self.models),
            "dataset": self.dataset,
            "engine": self.engine,
            "test_format": self.test_format,
            "max_tokens": self.max_tokens,
            "n_samples": self.n_samples,
            "temperature": SAMPLE_TEMPERATURE,
            "top_p": TOP_P,
            "test_ls": list(TEST_LS),
            **({"answers_from": self.answers_from} if self.answers_from else {}),
        }


@dataclass(frozen=True)
class RunProgress:
    model: str
    stage: str  # "generate" | "execute" | "costs"
    done: int
    total: int


def run_cascade_generation(
    config: RunConfig, store: GenerationStore, progress: Callable[[RunProgress], None] | None = None
) -> None:
    """Fill ``store`` with every generation and execution of ``config`` that it lacks."""
    report = progress or (lambda _: None)
    if not config.models:
        raise UserError("name at least one model (--models)")
    problems = load_cascade_problems(config.dataset, config.limit)  # bad names refused before anything is stored
    with store.writer():  # a second run on this store is refused before it writes anything
        _run(config, store, problems, report)


def _run(config: RunConfig, store: GenerationStore, problems: list[CascadeProblem], report) -> None:
    stored = store.meta("run_config")
    if stored is not None and {k: v for k, v in stored.items() if k != "models"} != {
        k: v for k, v in config.to_record().items() if k != "models"
    }:
        raise UserError(f"{store.path} was made with other settings ({stored}); use another --out")
    if config.answers_from is not None and any(parse_endpoint(m) for m in config.models):
        raise UserError("--answers-from takes local models' answers; an endpoint stage generates its own")
    source = _answers_source(config)  # refused before this store is written to
    _check_execution_rules(store, config, problems)
    store.set_meta("run_config", config.to_record())
    store.set_meta("machine", machine.provenance("")["machine"])
    limits = Limits(timeout_s=config.test_timeout_s, line_timeout_s=2.0)
    try:
        _measure_local_costs(config, store, problems[0], source, report)
        with SandboxPool() as pool:
            _generate_and_execute(config, store, problems, source, pool, limits, report)
    finally:
        if source is not None:
            source.close()


def _check_execution_rules(store: GenerationStore, config: RunConfig, problems: list[CascadeProblem]) -> None:
    """One store, one set of sandbox rules: results made under other rules are refused, or with ``re_execute``
    dropped (every problem is then executed again from its stored generations, so the run must cover all that
    is stored: every model, every problem)."""
    rules = store.execution_rules()
    if config.re_execute:
        ours, task_ids = {stage_name(m) for m in config.models}, {p.task_id for p in problems}
        left_out = sorted(store.models() - ours)
        beyond = sorted(t for m in store.models() & ours for t in store.generated_tasks(m, config.dataset)
                        if t not in task_ids)  # fmt: skip
        if left_out or beyond:
            why = (
                f"it also holds {left_out}" if left_out else f"{beyond[0]} and {len(beyond) - 1} more lie past --limit"
            )
            raise UserError(f"--re-execute drops every execution result of {store.path}, so it must run on all the "
                            f"store holds: {why} (name all its models, no smaller --limit)")  # fmt: skip
        log.info("dropping the stored execution results of %s: every problem is executed again", store.path)
        store.forget_executions(RULES_VERSION)
    elif rules is None:
        store.set_meta("sandbox_rules", RULES_VERSION)
    elif rules != RULES_VERSION:
        raise UserError(f"{store.path} holds results executed under sandbox rules {rules}, and this codeaccel's "
                        f"are {RULES_VERSION} (codeaccel.sandbox.execution.RULES_VERSION): add --re-execute to run "
                        "the stored generations again under them (nothing is generated again)")  # fmt: skip


def _generate_and_execute(config: RunConfig, store: GenerationStore, problems: list[CascadeProblem],
                          source: GenerationStore | None, pool: SandboxPool, limits: Limits,
                          report) -> None:  # fmt: skip
    """Model by model: first any problem generated but not executed (a run interrupted between the two),
    then what the store lacks generated, each problem executed as soon as it is stored."""
    for spec in config.models:
        name = stage_name(spec)
        todo = [p for p in problems if p.task_id not in store.generated_tasks(name, p.dataset)]
        endpoint = parse_endpoint(spec)
        if source is not None:
            _check_answers(source, name, todo)
            store.replace_batch_costs(name, list(source.batch_costs(name).values()))  # the answers' costs
        execute_stored(store, pool, limits, name, problems, report)  # left by an interrupted run, first
        execute_now = partial(execute_problem, store, pool, name, limits=limits)  # each problem once stored
        if endpoint and (todo or not store.batch_costs(name)):
            _generate_with_endpoint(EndpointStage(endpoint), config, store, problems, todo, execute_now, report)
        elif todo:  # a local model's costs are measured (or copied) already
            _generate_locally(spec, config, store, todo, source, execute_now, report)


def _measure_local_costs(config: RunConfig, store: GenerationStore, cp: CascadeProblem,
                         source: GenerationStore | None, report) -> None:  # fmt: skip
    """Every local model's batch costs that the store lacks (all of them with ``remeasure_costs``), one after
    another before anything is generated, so the family's costs come from one machine."""
    if source is not None:  # the answers' costs are the source's (copied per model in the run)
        return
    for spec in config.models:
        if parse_endpoint(spec) or (store.batch_costs(stage_name(spec)) and not config.remeasure_costs):
            continue
        engine = load_engine(spec, config.engine, n_ctx=4096)
        try:
            report(RunProgress(engine.model_name, "costs", 0, 1))
            store.replace_batch_costs(engine.model_name, measure_batch_costs(engine, cp))
            report(RunProgress(engine.model_name, "costs", 1, 1))
        finally:
            engine.close()


def _generate_locally(spec: str, config: RunConfig, store: GenerationStore, todo, source: GenerationStore | None,
                      stored_hook: Callable[[CascadeProblem], None], report) -> None:  # fmt: skip
    """A local model's generations (its costs are measured already): the problems back to back through
    one decoder, each stored as soon as all its sequences are done, then handed to ``stored_hook``."""
    engine = load_engine(spec, config.engine, n_ctx=4096)
    name = engine.model_name
    stored = 0

    def keep(cp: CascadeProblem, rows: list[StoredGeneration]) -> None:
        nonlocal stored
        copied = _copied_answers(source, name, cp) if source is not None else []
        store.add_generations(copied + rows)
        stored += 1
        report(RunProgress(name, "generate", stored, len(todo)))
        stored_hook(cp)

    try:
        with open_sequences(engine, n_seq_max=config.n_seq_max, n_ctx=config.n_ctx) as seqs:
            report(RunProgress(name, "generate", 0, len(todo)))
            generate_problems(engine, seqs, todo, config.generation, keep, answers=source is None)
    finally:
        engine.close()


ANSWER_SETTINGS = ("dataset", "engine", "max_tokens", "n_samples", "temperature", "top_p")


def _answers_source(config: RunConfig) -> GenerationStore | None:
    """The store answers are taken from; refused where its answers were made with other settings."""
    if config.answers_from is None:
        return None
    path = Path(config.answers_from)
    if not path.is_file():
        raise UserError(f"--answers-from: no cascade store at {path}")
    source = GenerationStore(path)
    made = source.meta("run_config") or {}
    ours = config.to_record()
    other = [k for k in ANSWER_SETTINGS if made.get(k) != ours[k]]
    if other:
        source.close()
        raise UserError(f"--answers-from {path} was made with other {', '.join(other)}: its answers are not these")
    return source


def _check_answers(source: GenerationStore, model: str, todo) -> None:
    """Every problem still to do has its answers, executed, in the source (refused before anything runs)."""
    executed = {dataset: source.executed_tasks(model, dataset) for dataset in {cp.dataset for cp in todo}}
    missing = [cp.task_id for cp in todo if cp.task_id not in executed[cp.dataset]]
    if missing:
        raise UserError(f"--answers-from {source.path} lacks executed answers of {model} for {len(missing)} "
                        f"problems (first: {missing[0]})")  # fmt: skip
    if not source.batch_costs(model):
        raise UserError(f"--answers-from {source.path} has no batch costs for {model}")


def _copied_answers(source: GenerationStore, model: str, cp: CascadeProblem) -> list[StoredGeneration]:
    return [replace(g, id=None) for g in source.generations(model, cp.dataset, cp.task_id) if g.kind == "answer"]


def _generate_with_endpoint(stage: EndpointStage, config: RunConfig, store: GenerationStore, problems, todo,
                            stored_hook: Callable[[CascadeProblem], None], report) -> None:  # fmt: skip
    """An endpoint stage's generations: checked reachable first, costs measured once, then problem by problem."""
    aborted = True
    try:
        stage.check()
        if not store.batch_costs(stage.model_name):
            report(RunProgress(stage.model_name, "costs", 0, 1))
            store.replace_batch_costs(stage.model_name, stage.measure_costs(problems[0]))
        for i, cp in enumerate(todo):
            report(RunProgress(stage.model_name, "generate", i, len(todo)))
            store.add_generations(stage.generate(cp, config.n_samples, TEST_LS, config.max_tokens, TOP_P))
            stored_hook(cp)
        report(RunProgress(stage.model_name, "generate", len(todo), len(todo)))
        aborted = False
    finally:
        stage.close(aborted)  # after an error or Ctrl-C: requests in flight are not waited for


def execute_stored(store: GenerationStore, pool: SandboxPool, limits: Limits, model: str, problems, report) -> None:
    """Run every stored, not yet executed problem of one model through the sandbox."""
    todo = [p for p in problems if p.task_id not in store.executed_tasks(model, p.dataset)
            and p.task_id in store.generated_tasks(model, p.dataset)]  # fmt: skip
    if not todo:
        return
    for i, cp in enumerate(todo):
        report(RunProgress(model, "execute", i, len(todo)))
        execute_problem(store, pool, model, cp, limits)
    report(RunProgress(model, "execute", len(todo), len(todo)))


def execute_problem(store: GenerationStore, pool: SandboxPool, model: str, cp: CascadeProblem, limits: Limits) -> None:
    gens = store.generations(model, cp.dataset, cp.task_id)
    answers = [g for g in gens if g.kind == "answer"]
    tests = [g for g in gens if g.kind == "test"]
    lines_of = {g.id: extract_test_lines(g.text, cp.entry_point, g.l) for g in tests}
    distinct = list(dict.fromkeys(line for lines in lines_of.values() for line in lines))
    jobs = [Job(cp.reference, distinct, limits)]
    jobs += [Job(cp.problem.solution(a.text), cp.problem.tests, limits) for a in answers]  # official tests
    jobs += [Job(cp.problem.code_prefix + a.text + "\n", distinct, limits) for a in answers]  # self-tests
    results = pool.map_every_line(jobs)  # every line its own chance, however slow the answer
    reference, official, own = results[0], results[1 : 1 + len(answers)], results[1 + len(answers) :]
    valid = {line: r.status == "passed" for line, r in zip(distinct, reference.tests)}
    store.add_executions(
        model,
        cp.dataset,
        cp.task_id,
        test_lines={gid: [(line, valid.get(line, False)) for line in lines] for gid, lines in lines_of.items()},
        answer_results={a.id: (r.passed, r.status) for a, r in zip(answers, official)},
        line_results={
            a.id: {line: t.status == "passed" for line, t in zip(distinct, r.tests)} for a, r in zip(answers, own)
        },
    )
