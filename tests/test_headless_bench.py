"""The benchmark library without the command line: one provenance header, one HumanEval loader,
progress through callbacks (nothing under bench/ draws), and run_benchmark's modes."""

import ast
import json
from pathlib import Path

import pytest

from codeaccel import machine
from codeaccel.bench import datasets, lookup_bench
from codeaccel.bench.report import write_report
from codeaccel.engines.cost_curve import CostCurve, save_cost_curve
from codeaccel.errors import UserError

BENCH = Path(__file__).resolve().parents[1] / "src" / "codeaccel" / "bench"
HEADER = ("command", "machine", "date")


def _fake_provenance(command: str) -> dict:
    return {
        "command": command,
        "machine": {"cores": 3, "cpu_model": "Sentinel CPU 9000", "memory_gib": 1.0},
        "date": "1999-12-31T23:59:59+00:00",
    }


def test_every_results_file_takes_its_header_from_machine_provenance(monkeypatch, tmp_path):
    from codeaccel.cli.display import save_results  # the CLI's writer of small results (lookup, sandbox)

    monkeypatch.setattr(machine, "provenance", _fake_provenance)
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    curve = CostCurve(
        model="m", engine="llama.cpp", dtype=None, context_tokens=8, repeats=1,
        k=[1, 2], seconds=[0.01, 0.015], relative=[1.0, 1.5],
    )  # fmt: skip
    save_cost_curve(curve, tmp_path / "profile", command="codeaccel profile m")
    row = {"dataset": "humaneval", "model": "m", "engine": "llama.cpp", "method": "autoregressive", "variant": ""}
    row |= {"n_problems": 1, "pass_at_1": 1.0, "tokens_per_s": 10.0}
    write_report([row], tmp_path / "bench", "codeaccel bench humaneval", config={}, name="summary")
    save_results(
        {"n_queries": 1},
        tmp_path / "lookup",
        "lookup",
        lambda doc: f"Machine: {doc['machine']['cpu_model']}; {doc['date']}\n",
        command="codeaccel index bench",
    )
    written = {
        "codeaccel profile m": tmp_path / "profile" / "cost_curve-llama.cpp-m",
        "codeaccel bench humaneval": tmp_path / "bench" / "summary",
        "codeaccel index bench": tmp_path / "lookup" / "lookup",
    }
    for command, stem in written.items():
        doc = json.loads(stem.with_name(stem.name + ".json").read_text())
        assert list(doc)[:3] == list(HEADER), stem  # the header first, as before
        assert {k: doc[k] for k in HEADER} == _fake_provenance(command), stem
        md = stem.with_name(stem.name + ".md").read_text()
        assert "Sentinel CPU 9000" in md and "1999-12-31T23:59:59+00:00" in md, stem
    cached = json.loads((tmp_path / "cache" / "cost_curves" / "llama.cpp-m.json").read_text())
    assert {k: cached[k] for k in HEADER} == _fake_provenance("codeaccel profile m")


def test_provenance_is_the_command_this_machine_and_the_utc_date():
    header = machine.provenance("codeaccel bench mbpp")
    assert list(header) == list(HEADER) and header["command"] == "codeaccel bench mbpp"
    assert header["machine"] == machine.machine_info()
    assert header["date"].endswith("+00:00") and "." not in header["date"]  # UTC, whole seconds


_FAKE_ROWS = (
    {
        "task_id": "HumanEval/900",
        "prompt": "def one():\n",
        "canonical_solution": "    return 1\n",
        "test": "def check(f):\n    assert f() == 1\n",
        "entry_point": "one",
    },
    {
        "task_id": "HumanEval/901",
        "prompt": "def two():\n",
        "canonical_solution": "    return 2\n",
        "test": "def check(f):\n    assert f() == 2\n",
        "entry_point": "two",
    },
)


def test_humaneval_problems_and_lookup_queries_come_from_one_loader(monkeypatch):
    monkeypatch.setattr(datasets, "humaneval_rows", lambda: _FAKE_ROWS)
    problems = datasets.load_problems("humaneval")
    assert [p.task_id for p in problems] == ["HumanEval/900", "HumanEval/901"]
    assert problems[1].code_prefix == "def two():\n" and problems[1].tests == ("check(two)",)
    tokenize = lambda text: list(text.encode())  # noqa: E731
    queries = lookup_bench.humaneval_queries(tokenize, 4, seed=0)
    prompts = [tokenize(r["prompt"]) for r in _FAKE_ROWS]
    assert [q[: len(prompts[i % 2])] for i, q in enumerate(queries)] == [prompts[i % 2] for i in range(4)]


def test_the_humaneval_loader_reads_the_file_once():
    datasets.humaneval_rows.cache_clear()
    first = datasets.humaneval_rows()
    assert len(first) == 164 and first[0]["task_id"] == "HumanEval/0"
    assert datasets.humaneval_rows() is first
    assert datasets.humaneval_rows.cache_info().misses == 1


def test_nothing_under_bench_imports_rich():
    drawing = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            drawing += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "rich"]
    assert drawing == []


def _record(task_id: str, tiny: str, **kw) -> dict:
    from codeaccel.bench.harness import BenchConfig

    return {
        "dataset": "humaneval", "task_id": task_id, "model": Path(tiny).stem, "engine": "llama.cpp",
        "method": "autoregressive", "config": BenchConfig(model=tiny).record_config(),
        "n_prompt_tokens": 10, "n_generated": 4, "prefill_s": 0.01, "decode_s": 0.1, "tokens_per_s": 40.0,
        "finish_reason": "stop", "passed": False, "test_status": "stale", "completion": "    return 0\n",
        "tokens": [1, 2, 3, 4], "stats": {}, **kw,
    }  # fmt: skip


def test_run_benchmark_summarises_and_rescores_stored_records_without_a_model(tiny_gguf, tmp_path):
    from codeaccel.bench.harness import BenchConfig, BenchProgress
    from codeaccel.bench.run import default_out_dir, parse_datasets, run_benchmark
    from codeaccel.bench.store import ResultStore

    config = BenchConfig(model=tiny_gguf, datasets=("humaneval",), limit=2)
    store = ResultStore(tmp_path / "results.jsonl")
    for task in ("HumanEval/0", "HumanEval/1"):
        store.add(_record(task, tiny_gguf))
    summary = run_benchmark(config, tmp_path, "report-only", command="codeaccel bench humaneval", name="s")
    assert [(r["method"], r["n_problems"], r["n_passed"]) for r in summary.rows] == [("autoregressive", 2, 0)]
    assert [p.name for p in summary.files] == ["s.json", "s.md", "s.png", "results.jsonl"]
    assert all(p.exists() for p in summary.files) and summary.report["command"] == "codeaccel bench humaneval"
    assert summary.report["rows"] == summary.rows and summary.out_dir == tmp_path

    seen: list[BenchProgress] = []
    rescored = run_benchmark(config, tmp_path, "rescore", command="c", progress=seen.append)
    assert seen[0] == BenchProgress(0, 2, None, "rescore") and seen[-1] == BenchProgress(2, 2, None, "rescore")
    assert all(r["test_status"] != "stale" for r in rescored.records)  # the tests were run again

    with pytest.raises(UserError, match="no stored results"):
        run_benchmark(BenchConfig(model=tiny_gguf, max_tokens=7, limit=2), tmp_path, "report-only")
    with pytest.raises(UserError, match="unknown dataset"):
        parse_datasets("humaneval,apps", None)
    assert parse_datasets(" HumanEval, mbpp ,", 3) == ("humaneval", "mbpp")
    assert default_out_dir("/models/tiny.gguf", "llama.cpp") == Path("runs/tiny-llama.cpp")


def test_progress_writes_plain_lines_where_its_console_is_no_terminal(monkeypatch):
    """A run in the background (output to a file) shows its progress as lines, throttled, and its completion once."""
    import io

    from rich.console import Console
    from rich.progress import BarColumn, TextColumn

    from codeaccel.cli.display import LoggedProgress

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    bar, log = io.StringIO(), io.StringIO()
    columns = (TextColumn("{task.description}"), BarColumn())
    with LoggedProgress(*columns, console=Console(file=bar), log_console=Console(file=log), every_s=3600) as p:
        task = p.add_task("generate m", total=3)
        for done in range(1, 4):
            p.update(task, completed=done)
        p.advance(task, 0)  # after completion: nothing more
        p.update(task, total=5, completed=4)  # its total grew: lines again
        p.update(task, completed=5)
    lines = [line.split(",")[0] for line in log.getvalue().splitlines()]
    assert lines == ["generate m: 1/3", "generate m: 3/3", "generate m: 4/5", "generate m: 5/5"]
    assert "generate m:" not in bar.getvalue()  # the lines go to the log console, not among the results
    terminal, log = io.StringIO(), io.StringIO()
    terminal_console = Console(file=terminal, force_terminal=True)
    with LoggedProgress(TextColumn("{task.description}"), console=terminal_console, log_console=Console(file=log)) as p:
        p.update(p.add_task("generate m", total=1), completed=1)
    assert log.getvalue() == ""  # a terminal gets the bar alone


def test_run_bench_refuses_a_method_before_measuring_the_logit_noise(tiny_gguf, tmp_path):
    """No datastore for retrieval: the refusal comes before the (slow) logit-noise measurement writes its file."""
    from codeaccel.bench.harness import BenchConfig, run_bench
    from codeaccel.bench.store import ResultStore
    from codeaccel.methods.registry import MethodOptions

    options = MethodOptions(datastores=(str(tmp_path / "no-datastore"),))
    config = BenchConfig(model=tiny_gguf, methods=("autoregressive", "retrieval"), limit=1, options=options)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no datastore"):
        run_bench(config, ResultStore(out / "results.jsonl"))
    assert not out.exists() or list(out.iterdir()) == []  # no logit_noise-*.json, no record
