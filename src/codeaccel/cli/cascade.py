"""``codeaccel cascade``: run (generate + execute into the store), tune (Pareto search + report), report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from codeaccel.cascade.config import KS, Stage, enumerate_configs, make_config
from codeaccel.cascade.cost import CPU_USD_PER_HOUR
from codeaccel.cascade.endpoint import parse_endpoint, stage_name
from codeaccel.cascade.problems import check_dataset, function_problem, load_cascade_problems
from codeaccel.cascade.replay import Replay
from codeaccel.cascade.report import write_report
from codeaccel.cascade.run import RunConfig, RunProgress, run_cascade_generation
from codeaccel.cascade.scoring import SCORERS, Scorer
from codeaccel.cascade.self_tests import SHOWN_TESTS, TEST_FORMATS, own_test_filter
from codeaccel.cascade.solve import CascadeSolver, choose_tuned, parse_stages
from codeaccel.cascade.store import GenerationStore
from codeaccel.cascade.tuner import Chosen, tune
from codeaccel.cli.display import LoggedProgress, err, out
from codeaccel.cli.options import (
    check_finite,
    check_folder,
    check_model,
    comma_list,
    command_line,
    read_stdin_text,
    read_text_file,
)
from codeaccel.engines import ENGINES
from codeaccel.errors import UserError
from codeaccel.models.registry import BUNDLED, canonical_name

app = typer.Typer(help="Model cascading with self-generated tests.", no_args_is_help=True)

DEFAULT_MODELS = "qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"
Models = Annotated[
    str,
    typer.Option(
        "--models",
        help="The family, smallest first, comma-separated: bundled names, GGUF paths, or openai:MODEL@BASE_URL "
        "(an OpenAI-compatible chat endpoint; key from OPENAI_API_KEY). In tune and report a model may follow "
        "itself (escalation within the model: the later stage extends the earlier).",
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Folder of the store (store.sqlite) and the report.")]
ShownTests = Annotated[
    str,
    typer.Option(
        "--shown-tests",
        help="exclude: self-test lines calling the function with the arguments of an official test the prompt "
        "shows (MBPP shows all it is graded by) do not count; keep: they do (the grader's tests then choose).",
    ),
]


def _scorer(value: str) -> Scorer:
    for known in SCORERS:
        if value == known:
            return known
    raise UserError(f"--scorer must be one of {', '.join(SCORERS)}, got {value!r}")


def _loadable(spec: str) -> str:
    """How a report names a model so that ``cascade solve`` loads it from anywhere: a bundled model's full
    name, an endpoint as given, a file or directory by its absolute path."""
    if parse_endpoint(spec):
        return spec
    name = canonical_name(spec)
    return name if name in BUNDLED else str(Path(spec).expanduser().resolve())


def _check_shown_tests(value: str) -> None:
    if value not in SHOWN_TESTS:
        raise UserError(f"--shown-tests must be one of {', '.join(SHOWN_TESTS)}, got {value!r}")


def _models(spec: str, *, may_follow_itself: bool = False) -> tuple[str, ...]:
    """The family; with ``may_follow_itself`` (tune) a model may be named again right after itself."""
    if not spec.strip():
        raise UserError("--models names no model")
    if may_follow_itself:
        models = tuple(m.strip() for m in spec.split(","))
        distinct = tuple(m for i, m in enumerate(models) if i == 0 or m != models[i - 1])
        comma_list(",".join(distinct), "--models (a model may only follow itself)")  # empty or come back: refused
    else:
        models = comma_list(spec, "--models")
    for model in dict.fromkeys(models):
        if not parse_endpoint(model):  # a malformed endpoint is refused before anything runs
            check_model(model)  # so is a local model that does not exist
    return models


@app.command("run")
def run(
    dataset: Annotated[str, typer.Argument(help="humaneval or mbpp.")],
    models: Models = DEFAULT_MODELS,
    engine: Annotated[str, typer.Option(help=f"One of {', '.join(ENGINES)}.")] = "llama.cpp",
    limit: Annotated[int | None, typer.Option(help="First N problems only.")] = None,
    test_format: Annotated[str, typer.Option(help=f"Self-test prompt: {' or '.join(TEST_FORMATS)}.")] = "chat",
    n_seq_max: Annotated[int, typer.Option(help="Sequences decoded at once.")] = RunConfig.n_seq_max,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    answers_from: Annotated[
        Path | None,
        typer.Option(help="Another run's store.sqlite: take its answers, generate only the tests (compare formats)."),
    ] = None,
    remeasure_costs: Annotated[
        bool,
        typer.Option(help="Measure every local model's batch costs again, here (all from one machine)."),
    ] = False,
    re_execute: Annotated[
        bool,
        typer.Option(
            help="Drop every stored execution result and execute the stored generations again (after "
            "the sandbox's rules changed); nothing stored is generated again."
        ),
    ] = False,
    out_dir: Out = Path("runs/cascade"),
) -> None:
    """Generate (batched) every answer and test a sweep can use, execute them, store all; resumable."""
    check_dataset(dataset)
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if test_format not in TEST_FORMATS:
        raise UserError(f"--test-format must be one of {', '.join(TEST_FORMATS)}, got {test_format!r}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if not 1 <= n_seq_max <= 64:
        raise UserError(f"--n-seq-max must be in 1..64, got {n_seq_max}")
    family = _models(models)  # refused before the store is opened
    if answers_from is not None and any(parse_endpoint(m) for m in family):
        raise UserError("--answers-from takes local models' answers; an endpoint stage generates its own")
    check_folder(out_dir)
    if answers_from is not None and not answers_from.is_file():
        raise UserError(f"--answers-from: no cascade store at {answers_from}")
    if answers_from is not None and answers_from.resolve() == (out_dir / "store.sqlite").resolve():
        raise UserError("--answers-from names the store this run writes: give another --out")
    if remeasure_costs and answers_from is not None:
        raise UserError("--remeasure-costs: with --answers-from the answers' costs are the other store's")
    if test_format != "chat" and any(parse_endpoint(m) for m in family):
        raise UserError("an endpoint stage asks for its tests in the chat format: use --test-format chat")
    config = RunConfig(
        models=family,
        dataset=dataset,
        engine=engine,
        limit=limit,
        test_format=test_format,
        n_seq_max=n_seq_max,
        max_tokens=max_tokens,
        answers_from=str(answers_from) if answers_from is not None else None,
        remeasure_costs=remeasure_costs,
        re_execute=re_execute,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with GenerationStore(out_dir / "store.sqlite") as store, LoggedProgress(*columns, console=err) as progress:
        tasks: dict[tuple[str, str], int] = {}

        def show(p: RunProgress) -> None:
            if not tasks:  # the first progress: the run passed its checks, the store is this command's
                store.set_meta("command_re_execute" if re_execute else "command_run", command_line())
            key = (p.model, p.stage)
            if key not in tasks:
                tasks[key] = progress.add_task(f"{p.stage} {p.model}", total=p.total)
            progress.update(tasks[key], completed=p.done, total=p.total)

        run_cascade_generation(config, store, show)
    out.print(f"stored in {out_dir / 'store.sqlite'}")


@app.command("tune")
def tune_command(
    dataset: Annotated[str, typer.Argument(help="humaneval or mbpp.")],
    models: Models = DEFAULT_MODELS,
    limit: Annotated[int | None, typer.Option(help="First N problems only (as stored).")] = None,
    scorer: Annotated[str, typer.Option(help=f"{' or '.join(SCORERS)}.")] = "cascade",
    per_model_theta: Annotated[bool, typer.Option(help="A θ per model (beyond the paper).")] = False,
    usd_per_hour: Annotated[float, typer.Option(help="Price of the machine per hour.")] = CPU_USD_PER_HOUR,
    shown_tests: ShownTests = "exclude",
    calibrate_costs: Annotated[
        bool,
        typer.Option(help="Scale each model's measured costs to the speed the sweep actually ran at (median)."),
    ] = True,
    store_file: Annotated[
        Path | None, typer.Option("--store", help="Replay this store (default: OUT/store.sqlite); reports go to OUT.")
    ] = None,
    out_dir: Out = Path("runs/cascade"),
) -> None:
    """Replay every valid (k, l, θ) over the store, choose per budget on ~30% of the problems, measure the
    choices on the other ~70%, report."""
    chosen_scorer = _scorer(scorer)
    _check_shown_tests(shown_tests)
    check_finite(usd_per_hour, "--usd-per-hour")
    family = _models(models, may_follow_itself=True)
    names = [stage_name(m) for m in family]
    distinct = list(dict.fromkeys(names))
    specs = {name: _loadable(m) for name, m in zip(names, family)}  # for `cascade solve --tuned`
    store_path = store_file if store_file is not None else out_dir / "store.sqlite"
    if not store_path.is_file():
        raise UserError(f"no cascade store at {store_path}: run `codeaccel cascade run {dataset} --out {out_dir}`")
    check_folder(out_dir, "--out")
    with GenerationStore(store_path) as store:
        run_config = store.meta("run_config") or {}
        problems = load_cascade_problems(dataset, limit)
        done = set.intersection(*(store.executed_tasks(m, problems[0].dataset) for m in distinct))
        task_ids = [p.task_id for p in problems if p.task_id in done]
        if len(task_ids) < 10:
            raise UserError(f"only {len(task_ids)} problems are generated and executed for every model: need 10")
        keep_line = own_test_filter(problems) if shown_tests == "exclude" else None
        replay = Replay(store, problems[0].dataset, task_ids, keep_line=keep_line, calibrate=calibrate_costs)
        configs = list(enumerate_configs(names, per_model_theta=per_model_theta))
        err.print(f"{len(configs)} configurations over {len(task_ids)} problems")
        result = tune(replay, configs, task_ids, chosen_scorer)
        reference_config = make_config([Stage(m, -1, 0) for m in names[:-1]] + [Stage(names[-1], 0, 0)], 0.0)
        reference = Chosen(replay.evaluate(reference_config, result.tune_ids, chosen_scorer),
                           replay.evaluate(reference_config, result.validate_ids, chosen_scorer))  # fmt: skip
        validity = [v for m in distinct
                    for v in store.line_validity(m, problems[0].dataset, keep_line, task_ids)]  # fmt: skip
        greedy = []
        for name in distinct:  # each model's greedy answer alone, every problem
            i = names.index(name)
            alone = make_config([Stage(m, 0 if j == i else -1, 0) for j, m in enumerate(names)], 0.0)
            one_sequence = replay.costs(name)[min(replay.costs(name))]  # the smallest batch measured: b = 1
            greedy.append((replay.evaluate(alone, task_ids, chosen_scorer), one_sequence.s_per_token))
        paths = write_report(
            result,
            out_dir,
            dataset=problems[0].dataset,
            engine=run_config.get("engine", "llama.cpp"),
            usd_per_hour=usd_per_hour,
            reference=reference,
            validity=validity,
            greedy=greedy,
            command=command_line(),
            stages_per_model=[names.count(m) for m in distinct],
            generation={key: run_config[key] for key in ("test_format", "max_tokens", "engine") if key in run_config},
            sandbox_rules=store.execution_rules(),
            shown_tests=shown_tests,
            cost_scales={m: replay.cost_scale(m) for m in distinct} if calibrate_costs else None,
            n_seq_max=replay.n_seq_max,
            model_specs=specs,
            spent={m: store.spend(m, problems[0].dataset) for m in distinct},
            headroom={m: {k: replay.any_passes(m, k, task_ids) for k in KS if k >= 3} for m in distinct},
        )
    for path in paths:
        out.print(f"wrote {path}")
    out.print(paths[1].read_text())


@app.command("report")
def report(
    dataset: Annotated[str, typer.Argument(help="humaneval or mbpp.")],
    models: Models = DEFAULT_MODELS,
    shown_tests: ShownTests = "exclude",
    out_dir: Out = Path("runs/cascade"),
) -> None:
    """What the store holds (generated, executed, test validity per model) and the last tune's tables."""
    _check_shown_tests(shown_tests)
    store_path = out_dir / "store.sqlite"
    if not store_path.is_file():
        raise UserError(f"no cascade store at {store_path}")
    key = check_dataset(dataset)
    keep_line = own_test_filter(load_cascade_problems(key)) if shown_tests == "exclude" else None
    with GenerationStore(store_path) as store:
        for name in dict.fromkeys(stage_name(m) for m in _models(models, may_follow_itself=True)):
            generated, executed = store.generated_tasks(name, key), store.executed_tasks(name, key)
            out.print(f"{name}: {len(generated)} problems generated, {len(executed)} executed")
            for v in store.line_validity(name, key, keep_line):
                left_out = f"; {v['left_out']} left out (they repeat a shown official test)" if v["left_out"] else ""
                out.print(f"  l={v['l']}: {v['lines']} test lines kept from {v['tests']} tests, "
                          f"{v['validity']} valid (the reference passes them){left_out}")  # fmt: skip
    for md in sorted(out_dir.glob(f"cascade-{key}-*.md")):
        out.print(md.read_text())


@app.command("solve")
def solve(
    spec: Annotated[
        str | None,
        typer.Argument(help="A file with the function's imports, signature and docstring ('-': stdin)."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="A benchmark problem instead: HumanEval/0, Mbpp/2, ...")] = None,
    stages: Annotated[
        str | None, typer.Option(help="MODEL:K:L per stage, comma-separated, smallest first (or --tuned).")
    ] = None,
    theta: Annotated[
        str | None, typer.Option(help="θ for --stages: one, or one per stage (comma-separated); default 0.5.")
    ] = None,
    tuned: Annotated[Path | None, typer.Option(help="A `cascade tune` JSON report: use the point it chose.")] = None,
    budget: Annotated[
        float | None,
        typer.Option(help="With --tuned: dollars per problem; the most accurate point within it on the tuning split."),
    ] = None,
    scorer: Annotated[
        str | None, typer.Option(help=f"{' or '.join(SCORERS)}; default cascade, with --tuned the report's.")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help=f"One of {', '.join(ENGINES)}; default llama.cpp, with --tuned the sweep's.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON, not just the code.")] = False,
) -> None:
    """Answer one function with a cascade configuration, live: stage by stage, self-tests in the sandbox."""
    if scorer is not None:
        _scorer(scorer)
    if engine is not None and engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if (spec is None) == (task is None):
        raise UserError("give a function (a file, or '-' for stdin) or --task, one of them")
    if (stages is None) == (tuned is None):
        raise UserError("give --stages or --tuned, one of them")
    if budget is not None and tuned is None:
        raise UserError("--budget picks among a --tuned report's points: give --tuned")
    if budget is not None:
        check_finite(budget, "--budget")
    if tuned is not None:
        if theta is not None:
            raise UserError("--theta is for --stages: the --tuned report's point has its own θ")
        point = choose_tuned(tuned, budget)
        config, chosen = point.config, point.row
        if scorer is not None and scorer != chosen["scorer"]:
            raise UserError(f"--scorer {scorer}: {tuned} tuned θ for {chosen['scorer']}: drop --scorer")
        scorer = chosen["scorer"]
        settings = {"max_tokens": point.max_tokens, "test_format": point.test_format, "shown_tests": point.shown_tests}
        engine = engine or point.engine
        err.print(f"chosen: {config.label()} (validation pass@1 {chosen['pass_at_1']}, ${chosen['cost_usd']:.3g})")
    else:
        config = parse_stages(stages or "", "0.5" if theta is None else theta)
        settings = {}
    for i in config.running:
        if not parse_endpoint(config.stages[i].model):
            check_model(config.stages[i].model)
    if task is not None:
        dataset = "humaneval" if task.lower().startswith("humaneval/") else "mbpp"
        matches = [p for p in load_cascade_problems(dataset) if p.task_id.lower() == task.strip().lower()]
        if not matches:
            raise UserError(f"--task: no problem {task!r} (HumanEval/0..163, Mbpp/<id> of MBPP-sanitized)")
        problem = matches[0]
    elif spec == "-":
        problem = function_problem(read_stdin_text(), "stdin")
    else:
        path = Path(spec or "")
        if not path.exists():
            raise UserError(f"no such file {path}: give the function's signature and docstring in a file, or '-'")
        problem = function_problem(read_text_file(path, "the function file"), path.name)
    with CascadeSolver(config, engine=engine or "llama.cpp", scorer=scorer or "cascade", **settings) as solver:  # type: ignore[arg-type]
        solution = solver.solve(problem, progress=lambda line: err.print(line))
    for o in solution.stages:
        score = "" if o.verdict is None else f", score {o.verdict.score}/{o.verdict.max_score}"
        err.print(f"{o.stage.label()}: {o.decided}{score} ({o.n_answers} answers, {o.n_lines} test lines, "
                  f"{o.generated_tokens} tokens, {o.seconds:.1f} s)")  # fmt: skip
    if solution.official_passed is not None:
        err.print(f"the benchmark's own tests: {'passed' if solution.official_passed else 'failed'}")
    if as_json:
        out.print_json(json.dumps(solution.to_record()))
    else:
        sys.stdout.write(solution.code)
