"""The benchmark harness: every method, on the same prompts, with the same tests.

For each problem and method (methods interleaved problem by problem, so that a
change in the machine's speed during a run affects every method alike): build the
prompt, generate, run the official tests in the sandbox, and store the record at
once (so a run resumes where it stopped). The target engine is loaded once and
shared by all methods.

Nothing here draws: :func:`run_bench` and :func:`rescore` report how far they are
through an optional ``progress`` callback (a :class:`BenchProgress` each time), and
the caller shows it as it likes (the CLI as a rich progress bar).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from codeaccel.bench.datasets import PROMPT_FORMAT, load_problems
from codeaccel.bench.edit_dataset import similarity_scores
from codeaccel.bench.logit_noise import first_divergence, load_or_measure
from codeaccel.bench.problem import Problem
from codeaccel.bench.store import ResultStore
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.engines.base import Engine
from codeaccel.engines.cost_curve import saved_curve_provenance
from codeaccel.engines.pool import EnginePool
from codeaccel.machine import machine_info
from codeaccel.methods.method import AutoregressiveMethod, Method
from codeaccel.methods.registry import MethodOptions, build_method, uses_cost_curve
from codeaccel.models.registry import resolve_model
from codeaccel.sandbox import ExecutionResult, Job, Limits, SandboxPool, execute
from codeaccel.sandbox import probe as probe_sandbox
from codeaccel.sandbox.execution import RULES_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    model: str
    engine: str = "llama.cpp"
    methods: tuple[str, ...] = ("autoregressive",)
    datasets: tuple[str, ...] = ("humaneval",)
    limit: int | None = None
    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams()
    dtype: str = "bfloat16"  # hf engine only
    n_ctx: int = 4096
    test_timeout_s: float = 10.0
    options: MethodOptions = MethodOptions()
    # the methods of one problem reuse the prompt's cache: the prefill is paid once per
    # problem (decode timings are unchanged; records say prefill_shared and the report
    # leaves them out of prefill and end-to-end figures)
    share_prefill: bool = False

    def record_config(self) -> dict:
        """What makes two records comparable (stored with each record)."""
        cfg = {
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": self.sampling.top_k,
            "seed": self.sampling.seed,
            "max_tokens": self.max_tokens,
            "prompt_format": PROMPT_FORMAT,
        }
        if self.engine == "hf":
            cfg["dtype"] = self.dtype
        return cfg


def problem_seed(seed: int | None, task_id: str) -> int | None:
    """A per-problem seed, so one problem's sample does not depend on which ran before it."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:4], "little")


def build_prompt(engine: Engine, problem: Problem) -> list[int]:
    if problem.raw_prompt is not None:
        return engine.tokenize(problem.raw_prompt)
    text = engine.apply_chat_template([{"role": "user", "content": problem.user_message}])
    return engine.tokenize(text + problem.response_prefix)


@dataclass(frozen=True)
class BenchProgress:
    """How far a run is: ``done`` of ``total`` (problem, method) pairs finished, ``passed`` of them
    passing (None where not counted: rescoring), and ``description``, what runs now."""

    done: int
    total: int
    passed: int | None
    description: str


ProgressCallback = Callable[[BenchProgress], None]


def run_bench(
    config: BenchConfig, store: ResultStore, resume: bool = True, progress: ProgressCallback | None = None
) -> list[dict]:
    """Run every (dataset, method) pair; return the records of this configuration.

    ``progress`` is called once all is loaded (nothing done yet), as each (problem, method)
    pair starts (its description) and as it finishes (done, passed)."""
    report = progress or (lambda _: None)
    problems = {d: load_problems(d, config.limit) for d in config.datasets}
    if any(p.tests for ps in problems.values() for p in ps):
        _warn_inactive_sandbox_layers()  # before any model loads: a missing layer is said at once
    engine = load_engine(config.model, config.engine, n_ctx=config.n_ctx, dtype=config.dtype)
    methods: list[Method] = []
    records: list[dict] = []
    cpu = machine_info()["cpu_model"]  # per record: a resumed run can span machines of one kind but another CPU
    pool = EnginePool()
    try:
        # every method first: a refused one (no datastore, a wrong option) is said before any measurement
        for name in config.methods:
            methods.append(build_method(name, engine, config.options, pool))
        if config.sampling.greedy and any(m != "autoregressive" for m in config.methods):
            # one measurement per results folder; the report reads it to classify divergences
            # code the target reads: the raw prompt, the started code and its tests, or (an edit set) the file
            texts = [
                (p.raw_prompt or p.code_prefix + p.test_program or p.user_message)[-2000:]
                for ps in problems.values()
                for p in ps[:4]
            ]
            load_or_measure(engine, texts, store.path.parent)
        # per record, like the CPU: the curve the methods just loaded (profiled, or measured on first use)
        curve = saved_curve_provenance(engine.kind, engine.model_name, engine.dtype)
        total = sum(len(p) for p in problems.values()) * len(methods)
        passed = done = 0
        report(BenchProgress(done, total, passed, "bench"))
        for dataset, dataset_problems in problems.items():
            # methods interleaved per problem: a drift in the machine's speed hits every method alike
            for problem in dataset_problems:
                prompt_cached = False  # a method ran on this problem here (not taken from the store on resume)
                for method in methods:
                    key = _record_key(config, engine, dataset, problem, method)
                    description = f"{dataset} {method.name} {problem.task_id}"
                    report(BenchProgress(done, total, passed, description))
                    record = store.get(key) if resume else None
                    if record is None:
                        # cold caches (no prompt prefix left by the previous method) unless shared, which
                        # needs an earlier method to have run on this very prompt in this process
                        shared = config.share_prefill and prompt_cached
                        if not shared:
                            engine.reset()
                            pool.reset()
                        record = _run_one(engine, method, problem, config, key)
                        prompt_cached = True
                        record.update(prefill_shared=shared, cpu=cpu, sandbox_rules=RULES_VERSION)
                        if uses_cost_curve(method.name) and curve:
                            record["target_cost_curve"] = curve
                        _compare_with_autoregressive(engine, store, config, dataset, problem, record)
                        store.add(record)
                    records.append(record)
                    passed += bool(record["passed"])
                    done += 1
                    report(BenchProgress(done, total, passed, description))
    finally:
        for method in methods:
            method.close()
        pool.close()
        engine.close()
    return records


def comparable_records(store: ResultStore, records: list[dict]) -> list[dict]:
    """All stored records comparable with this run's: same problems, model, engine and config.

    So runs of the same method with other settings (another draft engine, a fixed k),
    stored in the same results folder, share one table with this run.
    """
    problems = {(r["dataset"], r["task_id"]) for r in records}
    setups = {(r["model"], r["engine"], json.dumps(r["config"], sort_keys=True)) for r in records}
    return [
        r
        for r in store.records()
        if (r["dataset"], r["task_id"]) in problems
        and (r["model"], r["engine"], json.dumps(r["config"], sort_keys=True)) in setups
    ]


def _record_key(config: BenchConfig, engine: Engine, dataset: str, problem: Problem, method: Method) -> dict:
    key = {
        "dataset": dataset,
        "task_id": problem.task_id,
        "model": engine.model_name,
        "engine": engine.kind,
        "method": method.name,
        "config": config.record_config(),
    }
    if method.settings:
        key.update(method_settings=method.settings, variant=method.variant)
    return key


def _compare_with_autoregressive(
    engine: Engine, store: ResultStore, config: BenchConfig, dataset: str, problem: Problem, record: dict
) -> None:
    """Greedy only: is the output autoregressive decoding's? If not, the target's margin where it left it."""
    if record["method"] == "autoregressive" or not config.sampling.greedy:
        return
    reference = store.get(_record_key(config, engine, dataset, problem, AutoregressiveMethod(engine)))
    if reference is None:
        return
    record["identical_to_autoregressive"] = record["tokens"] == reference["tokens"]
    if not record["identical_to_autoregressive"]:
        prompt = build_prompt(engine, problem)
        record["divergence"] = first_divergence(engine, prompt, reference["tokens"], record["tokens"])


def _warn_inactive_sandbox_layers() -> None:
    missing = [layer.name for layer in probe_sandbox().layers() if not layer.active]
    if missing:
        log.warning("sandbox layers inactive on this machine: %s (codeaccel sandbox check)", ", ".join(missing))


def scores_of(result: ExecutionResult) -> dict:
    """What a record keeps of a sandbox run: overall, per test line, and whether the solution itself ran."""
    return {
        "passed": result.passed,
        "test_status": result.status,
        "test_lines": [t.status for t in result.tests],
        "setup_status": result.setup_status,  # not "ok": the completion raised before any official test ran
    }


def stored_records(config: BenchConfig, store: ResultStore) -> list[dict]:
    """The records of this configuration already in the store (nothing is generated; no model is loaded)."""
    model = resolve_model(config.model).name
    problems = {(d, p.task_id) for d in config.datasets for p in load_problems(d, config.limit)}
    return [
        r
        for r in store.records()
        if (r["dataset"], r["task_id"]) in problems
        and (r["model"], r["engine"]) == (model, config.engine)
        and r["method"] in config.methods
        and r["config"] == config.record_config()
    ]


def rescore(config: BenchConfig, store: ResultStore, progress: ProgressCallback | None = None) -> list[dict]:
    """Re-run the tests of stored completions with today's sandbox; no model is loaded.

    For results stored before a change to the sandbox or the test programs: generation
    (tokens, timings) stays as measured; only the test fields are replaced. ``progress``
    is called once the sandbox pool is up (nothing done yet) and as each test run finishes.
    """
    report = progress or (lambda _: None)
    problems = {(d, p.task_id): p for d in config.datasets for p in load_problems(d, config.limit)}
    todo = [r for r in stored_records(config, store) if problems[(r["dataset"], r["task_id"])].tests]
    limits = Limits(timeout_s=config.test_timeout_s)
    jobs = []
    for r in todo:
        problem = problems[(r["dataset"], r["task_id"])]
        jobs.append(Job(problem.solution(r["completion"]), problem.tests, limits))
    with SandboxPool() as pool:
        report(BenchProgress(0, len(todo), None, "rescore"))
        for done, (record, result) in enumerate(zip(todo, pool.map(jobs)), 1):
            record.update(scores_of(result))
            report(BenchProgress(done, len(todo), None, "rescore"))
    if todo:  # nothing rescored: the file is left as it is (lines it could not read included)
        store.rewrite()
    return todo


def _run_one(engine: Engine, method, problem: Problem, config: BenchConfig, key: dict) -> dict:
    prompt_tokens = build_prompt(engine, problem)
    params = replace(config.sampling, seed=problem_seed(config.sampling.seed, problem.task_id))
    prediction = engine.tokenize(problem.prediction) if problem.prediction else ()
    request = Request(prompt_tokens, params, config.max_tokens, problem.stop, problem.exclude_files, prediction)
    gen = method.generate(request)
    if problem.tests:
        result = execute(problem.solution(gen.text), problem.tests, Limits(timeout_s=config.test_timeout_s))
        scores = scores_of(result)
    else:
        scores = {"passed": None, "test_status": "no tests", **similarity_scores(problem, gen.text)}
    return {
        **key,
        "n_prompt_tokens": gen.n_prompt_tokens,
        "n_generated": gen.n_generated,
        "prefill_s": round(gen.prefill_s, 6),
        "decode_s": round(gen.decode_s, 6),
        "tokens_per_s": round(gen.tokens_per_s, 4),
        "finish_reason": gen.finish_reason,
        **scores,
        "completion": gen.text,
        "tokens": gen.tokens,
        "stats": gen.stats.to_record() if gen.stats is not None else {},
    }


def bench_config_dict(config: BenchConfig) -> dict:
    d = asdict(config)
    d["sampling"] = asdict(config.sampling)
    return d
