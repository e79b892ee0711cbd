"""The command line, as a user runs it: one-line errors, and the main jobs on a tiny model."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "codeaccel", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_sigterm_unwinds_like_an_error_and_leaves_no_sandbox_behind(tmp_path):
    """A terminated run (kill, a process manager's stop) used to vanish mid-execution, leaving its sandboxes'
    run folders and cgroups behind; now it unwinds (exit 143) and every sandbox is cleaned up."""
    import signal
    import tempfile
    import time
    from pathlib import Path

    from codeaccel.sandbox import probe

    def run_folders() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("codeaccel-run-*"))

    def leftovers() -> set[str]:
        cgroups = {
            f"{c.parent}/{p.name}" for c in probe().cgroups for p in c.parent.iterdir() if p.name.startswith("run-")
        }
        return {str(p) for p in run_folders()} | cgroups

    before, others = leftovers(), run_folders()  # another process's sandboxes (a benchmark) are not this run's
    cmd = [sys.executable, "-m", "codeaccel", "sandbox", "bench", "--n", "100", "--workers", "2"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(run_folders() - others) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)  # until the pool runs two sandboxes at once (the phase that left them behind)
        assert len(run_folders() - others) >= 2, "the pool never ran two sandboxes at once"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in proc.stderr.read()
    assert leftovers() - before == set()


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "hi", "-m", "no-such-model"], "unknown model"),
        (["generate", "hi", "-m", "/no/such/model.gguf"], "unknown model"),
        (["generate", "   ", "-m", "qwen2.5-coder-0.5b-instruct"], "prompt is empty"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--engine", "vllm", "-m", "{tiny}"], "unknown engine"),
        (["bench", "apps"], "unknown dataset"),
        (["bench", "humaneval", "--limit", "0"], "--limit"),
        (["bench", "humaneval", "--method", "magic"], "unknown method"),
        (["models", "fetch", "gpt-5"], "unknown bundled model"),
        (["profile", "{tiny}", "--k-max", "0"], "must be >= 1"),
        (["feedback", "add", "--prompt", "@/no/such/file", "--completion", "x"], "the prompt file /no/such/file"),
        (["feedback", "add", "--prompt", "@/", "--completion", "x"], "is a folder"),
        (["cascade", "solve", "/", "--stages", "qwen2.5-coder-0.5b-instruct:0:0"], "is a folder"),
        (["bench", "repo:no_such_pkg.sub"], "is not installed"),
        (["bench", "repo:.relative"], "is not installed"),
        (["feedback", "add", "--prompt", "p", "--completion", ""], "completion is empty"),
        (["feedback", "list", "--store", "mysql://x"], "sqlite:///PATH"),
        (["client", "hi", "--draft-model", "{tiny}", "--server", "http://127.0.0.1:9"], "cannot reach the server"),
        (["client", "hi", "--draft-model", "{tiny}", "--draft-tokens", "100"], "--draft-tokens"),
    ],
)
def test_bad_input_gives_one_line_error(args, message, tiny_gguf):
    result = run_cli(*[a.replace("{tiny}", tiny_gguf) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line_exit_2(tiny_gguf):
    import subprocess

    for command in (["generate", "-", "-m", tiny_gguf], ["client", "-", "--draft-model", tiny_gguf]):
        result = subprocess.run([sys.executable, "-m", "codeaccel", *command], input=b"\xff\xfe def",
                                capture_output=True, timeout=120)  # fmt: skip
        stderr = result.stderr.decode()
        assert result.returncode == 2 and "stdin is not UTF-8 text" in stderr and "Traceback" not in stderr


def test_ctrl_c_is_exit_130_with_a_line_saying_what_is_kept(tiny_gguf):
    """typer turns Ctrl-C into exit 130 before our handler could see it: the line saying that finished work
    is saved must still be printed (it was not)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "codeaccel", "generate", "-", "-m", tiny_gguf],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    time.sleep(4)  # started, waiting for the prompt on stdin
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (finished benchmark problems are saved" in stderr
    assert "Traceback" not in stderr


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    result = run_cli("generate", "hi", "-m", str(bad))
    assert result.returncode == 2 and "could not load" in result.stderr and "Traceback" not in result.stderr


def test_generate_prints_completion_and_timing(tiny_gguf):
    result = run_cli("generate", "def add(a, b):", "-m", tiny_gguf, "--max-tokens", "8", "--raw")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "prefill" in result.stderr


def test_bench_writes_results_and_resumes(tiny_gguf, tmp_path):
    out = tmp_path / "run"
    args = ["bench", "humaneval,mbpp", "-m", tiny_gguf, "--limit", "2", "--max-tokens", "8", "--out", str(out)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert doc["command"].startswith("codeaccel bench humaneval,mbpp")
    assert {"cores", "cpu_model"} <= set(doc["machine"]) and doc["date"]
    assert "process group + session" in doc["config"]["sandbox_layers"]  # what the tests ran under
    assert [(r["dataset"], r["n_problems"]) for r in doc["rows"]] == [("humaneval", 2), ("mbpp", 2)]
    for row in doc["rows"]:
        assert {"dataset", "model", "engine", "method", "n_problems", "tokens_per_s", "pass_at_1"} <= set(row)
        assert row["tokens_per_s"] > 0
    assert (out / "summary.md").read_text().count("| autoregressive |") == 2
    assert (out / "summary.png").stat().st_size > 1000
    records = (out / "results.jsonl").read_text().splitlines()
    assert len(records) == 4
    cpu = doc["machine"]["cpu_model"]
    assert all(json.loads(line)["cpu"] == cpu for line in records)  # each record says where it was measured
    assert doc["problems_by_cpu"] == {cpu: 4} and f"Problems measured on: {cpu} (4)" in (out / "summary.md").read_text()
    second = run_cli(*args)
    assert second.returncode == 0
    assert (out / "results.jsonl").read_text().splitlines() == records  # nothing regenerated
    third = run_cli(*args, "--no-resume")
    assert third.returncode == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 8
    # --rescore re-runs only the tests: a record scored wrongly (an old sandbox) is put right, nothing regenerated
    stored = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    truth = {r["task_id"]: (r["passed"], r["test_status"]) for r in stored}
    for r in stored:
        r["passed"], r["test_status"] = (not r["passed"]), "stale"
        del r["setup_status"]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    rescored = run_cli(*args, "--rescore")
    assert rescored.returncode == 0, rescored.stderr
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(after) == 4 and {r["task_id"]: (r["passed"], r["test_status"]) for r in after} == truth
    assert [r["tokens"] for r in after] == [r["tokens"] for r in stored[-4:]]
    doc = json.loads((out / "summary.json").read_text())
    assert all(0 <= row["solution_errors"] <= row["n_problems"] - row["n_passed"] for row in doc["rows"])
    assert "--rescore" not in doc["command"]  # the command recorded is the one that produces the results
    # --report-only summarises what is stored, here a subset, and generates nothing
    partial = run_cli(*[a if a != "2" else "1" for a in args], "--report-only")
    assert partial.returncode == 0, partial.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert [r["n_problems"] for r in doc["rows"]] == [1, 1] and "--report-only" not in doc["command"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    empty = run_cli(*args, "--report-only", "--temperature", "0.5")
    assert empty.returncode == 2 and "no stored results" in empty.stderr


def test_profile_saves_curve(tiny_gguf, tmp_path):
    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    result = run_cli(
        "profile", tiny_gguf, "--k-max", "4", "--repeats", "2", "--context", "16", "--out", str(tmp_path), env=env
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "cost_curve-llama.cpp-tiny.json").read_text())
    assert doc["k"] == [1, 2, 3, 4] and doc["relative"][0] == 1.0
    assert (tmp_path / "cost_curve-llama.cpp-tiny.png").exists()
    assert (tmp_path / "cache" / "cost_curves" / "llama.cpp-tiny.json").exists()


def test_bench_speculative_reports_acceptance_and_identity(tiny_gguf, tmp_path):
    """Greedy speculative decoding (draft = the target's own weights) reproduces autoregressive output."""
    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "spec"
    args = ["bench", "humaneval", "-m", tiny_gguf, "--limit", "2", "--max-tokens", "12", "--out", str(out)]
    result = run_cli(*args, "--method", "autoregressive,speculative-client-draft", "--draft-model", tiny_gguf, env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "summary.json").read_text())
    spec = next(r for r in doc["rows"] if r["method"] == "speculative-client-draft")
    assert spec["identical_to_autoregressive"] == 2 and spec["divergences_at_clear_margin"] == 0
    assert spec["mean_accepted_len"] > 1 and spec["target_s_per_token"] > 0
    assert spec["variant"] == "tiny on llama.cpp, draft_stop=confidence, context"  # context drafts first
    assert doc["logit_noise"]["tolerance"] >= 0 and list(out.glob("logit_noise-*.json"))
    [used] = doc["target_cost_curves"]  # the curve k was chosen from (measured on first use here)
    assert used["curve"]["command"] == "(measured on first use)" and used["curve"]["relative"][0] == 1.0
    assert used["problems"] == 2 and used["curve"]["cpu"] == doc["machine"]["cpu_model"]
    # re-profiled later: a --report-only summary still names the curve the run used, not the new one
    cached = tmp_path / "cache" / "cost_curves" / "llama.cpp-tiny.json"
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "command": "codeaccel profile tiny"}))
    result = run_cli(
        *args,
        "--method",
        "autoregressive,speculative-client-draft",
        "--draft-model",
        tiny_gguf,
        "--report-only",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert [u["curve"]["command"] for u in doc["target_cost_curves"]] == ["(measured on first use)"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"autoregressive", "speculative-client-draft"}
    assert all(r["identical_to_autoregressive"] for r in records if r["method"] != "autoregressive")
    # another variant into the same folder: one table with both, autoregressive not rerun
    result = run_cli(
        *args, "--method", "speculative-client-draft", "--draft-model", tiny_gguf, "--draft-k", "2", env=env
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "summary.json").read_text())
    variants = sorted(r["variant"] for r in doc["rows"])
    assert variants == ["", "tiny on llama.cpp, draft_stop=confidence, context", "tiny on llama.cpp, k=2"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_bench_refuses_bad_draft_settings(tiny_gguf, tmp_path):
    result = run_cli("bench", "humaneval", "-m", tiny_gguf, "--method", "speculative", "--draft-k", "0")
    assert result.returncode == 2 and "k must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_index_build_stats_update_and_errors(tiny_gguf, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def a():\n    return 1\n")
    (repo / "data.bin").write_bytes(b"\x00" * 10)
    out = tmp_path / "ds"
    built = run_cli("index", "build", "repository", "--root", str(repo), "-m", tiny_gguf, "--out", str(out))
    assert built.returncode == 0, built.stderr
    stats = run_cli("index", "stats", str(out), "--json")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["name"] == "repo-repo" and doc["files"] == 1 and doc["skipped"] == {"other suffix": 1}
    assert doc["tokens"] > 5 and doc["bytes_on_disk"] > 0
    (repo / "b.py").write_text("def b():\n    return 2\n")
    updated = run_cli("index", "update", str(out), "-m", tiny_gguf)
    assert updated.returncode == 0 and "added: 1" in updated.stdout
    for args, message in [
        (["index", "build", "weird"], "kind must be"),
        (["index", "build", "repository", "-m", tiny_gguf], "exactly one --root"),
        (["index", "stats", str(tmp_path / "nothing")], "missing or unreadable"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args


def test_bench_repository_level_with_retrieval(tiny_gguf, tmp_path):
    """repo:rich with the project as the repository source: lossless retrieval, similarity scores, no tests."""
    from codeaccel.bench.repo_dataset import package_root

    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    ds = tmp_path / "rich-ds"
    built = run_cli(
        "index", "build", "repository", "--root", str(package_root("rich")), "-m", tiny_gguf, "--out", str(ds)
    )
    assert built.returncode == 0, built.stderr
    stats = json.loads(run_cli("index", "stats", str(ds), "--json").stdout)
    assert stats["files"] >= 70  # the package is indexed even though an enclosing repository ignores it
    lookups = run_cli("index", "bench", "--datastore", str(ds), "-m", tiny_gguf, "--n", "40", "--out", str(tmp_path))
    assert lookups.returncode == 0, lookups.stderr
    latency = json.loads((tmp_path / "lookup.json").read_text())
    source = latency["sources"]["repo-rich"]
    assert latency["n_queries"] == 40 and source["tokens"] == stats["tokens"]
    assert 0 < source["median_ms"] <= source["p90_ms"] <= source["p99_ms"] and 0 < source["hit_rate"] <= 1
    assert latency["parallel_retrieve"]["median_ms"] > 0 and "| all sources in parallel |" in lookups.stdout
    # one source: "one after another" is the same lookups, timed per query
    assert latency["sequential_lookups"]["median_ms"] == source["median_ms"]
    out = tmp_path / "repo"
    args = ["bench", "repo:rich", "-m", tiny_gguf, "--limit", "2", "--max-tokens", "24", "--out", str(out)]
    methods = "autoregressive,retrieval,retrieval-rest"
    result = run_cli(*args, "--method", methods, "--datastore", str(ds), "--share-prefill", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"autoregressive", "retrieval", "retrieval-rest"}
    assert all(r["pass_at_1"] is None and 0 <= r["edit_similarity"] <= 1 for r in rows.values())
    assert (
        rows["retrieval"]["identical_to_autoregressive"] == 2
        and rows["retrieval-rest"]["identical_to_autoregressive"] == 2
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["passed"] is None and r["test_status"] == "no tests" for r in records)
    assert all(r["stats"]["retrieval"].get("lookups", 0) > 0 for r in records if r["method"].startswith("retrieval"))
    # --share-prefill: only the first method of each problem paid its prefill, and only it counts for prefill
    assert [r["prefill_shared"] for r in records] == [False, True, True] * 2
    assert rows["autoregressive"]["mean_prefill_ms"] > 0 and rows["autoregressive"]["end_to_end_tokens_per_s"] > 0
    assert rows["retrieval"]["mean_prefill_ms"] is None and rows["retrieval"]["end_to_end_tokens_per_s"] is None
    assert "| None |" not in (out / "summary.md").read_text()  # a figure not measured is a blank cell
    # resumed with the first method's records kept and the others' dropped: nothing ran on the prompt before
    # them in this process, so they pay their prefill (and say so)
    kept = [line for line in (out / "results.jsonl").read_text().splitlines()
            if json.loads(line)["method"] == "autoregressive"]  # fmt: skip
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    again = run_cli(*args, "--method", methods, "--datastore", str(ds), "--share-prefill", env=env)
    assert again.returncode == 0, again.stderr
    resumed = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["prefill_shared"]) for r in resumed[2:]] == [
        ("retrieval", False),
        ("retrieval-rest", True),
    ] * 2


def test_generate_with_speculative_method_logs_drafts(tiny_gguf, tmp_path):
    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    args = ["generate", "def add(a, b):", "-m", tiny_gguf, "--max-tokens", "12", "--raw"]
    result = run_cli(*args, "--method", "speculative-client-draft", "--draft-model", tiny_gguf, env=env)
    assert result.returncode == 0, result.stderr
    assert "draft tokens accepted" in result.stderr and "ms/token" in result.stderr


def test_retrieval_without_a_datastore_is_a_clear_error(tiny_gguf, tmp_path):
    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    args = ["bench", "humaneval", "-m", tiny_gguf, "--method", "retrieval"]
    result = run_cli(*args, "--limit", "1", env=env, cwd=tmp_path)  # its default results folder: under tmp_path
    assert result.returncode == 2 and "no datastore" in result.stderr and "codeaccel index build" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(*args, "--ablate", "magic", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "unknown ablation 'magic'" in result.stderr


def test_sandbox_check_and_bench(tmp_path):
    check = run_cli("sandbox", "check")
    assert check.returncode == 0, check.stderr
    assert "network" in check.stdout and "a test execution: passed" in check.stdout
    bench = run_cli("sandbox", "bench", "--n", "3", "--out", str(tmp_path))
    assert bench.returncode == 0, bench.stderr
    doc = json.loads((tmp_path / "sandbox.json").read_text())
    assert doc["command"] == "codeaccel sandbox bench --n 3 --out " + str(tmp_path)
    results = doc["results"]
    assert results["bare_python"]["n"] == results["sandbox_sequential"]["n"] == results["sandbox_pool"]["n"] == 3
    assert results["sandbox_pool"]["executions_per_s"] > 0 and (tmp_path / "sandbox.md").exists()
    bad = run_cli("sandbox", "bench", "--n", "0")
    assert bad.returncode == 2 and "--n must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "humaneval,humaneval", "-m", "{tiny}"], "names 'humaneval' twice"),
        (["bench", ",", "-m", "{tiny}"], "empty item"),
        (["bench", "humaneval", "-m", "{tiny}", "--method", "autoregressive,,prompt-lookup"], "empty item"),
        (["bench", "humaneval", "-m", "{tiny}", "--dtype", "float8"], "--dtype"),
        (["bench", "humaneval", "-m", "{tiny}", "--name", "../elsewhere"], "--name"),
        (["bench", "humaneval", "-m", "{tiny}", "--rescore", "--report-only"], "exclude each other"),
        (["bench", "humaneval", "-m", "{tiny}", "--out", "{file}"], "not a folder"),
        (["bench", "humaneval", "-m", "{tiny}", "--method", "speculative", "--draft-engine", "vllm"], "--draft-engine"),
        (["bench", "humaneval", "-m", "{tiny}", "--method", "retrieval", "--datastore", "{tmp}/no"], "no datastore"),
        (["generate", "hi", "-m", "{tiny}", "--method", "autoregressive,prompt-lookup"], "runs one method"),
        (["generate", "hi", "-m", "{tiny}", "--dtype", "float8"], "--dtype"),
        (["generate", "hi", "-m", "{tiny}", "--stop", ""], "--stop is empty"),
        (["profile", "{tiny}", "--draft-vocab", "10"], "at least 256"),
        (["profile", "{tiny}", "--out", "{file}/sub"], "not a folder"),
        (["cascade", "run", "humaneval", "--models", "{tiny},{tiny}", "--out", "{tmp}/c"], "twice"),
        (["cascade", "run", "humaneval", "--models", "{tiny}", "--out", "{file}"], "not a folder"),
        (["cascade", "tune", "humaneval", "--models", "{tiny}", "--usd-per-hour", "inf"], "finite"),
        (["cascade", "tune", "humaneval", "--models", "{tiny},qwen2.5-coder-0.5b-instruct,{tiny}"], "follow itself"),
        (["index", "build", "general", "--root", "{tmp}/no", "-m", "{tiny}"], "not a directory"),
        (["index", "build", "repository", "--root", "{tmp}", "-m", "{tiny}", "--out", "{file}"], "not a folder"),
        (["sandbox", "bench", "--workers", "0"], "--workers"),
        (["sandbox", "bench", "--n", "1", "--out", "{file}"], "not a folder"),
        (["dataset", "build-edits", "--git-dir", "{tmp}", "--out", "{tmp}/e.jsonl.gz", "--glob", ""], "--glob"),
        (["feedback", "list", "--store", "{tmp}/missing.sqlite"], "no accepted-completion store"),
        (["feedback", "list", "--store", "{tmp}/missing.sqlite", "--after", "-1"], "--after"),
        (["feedback", "list", "--store", "{file}"], "not an SQLite database"),
        (["feedback", "add", "--prompt", "p", "--completion", "c", "--store", "{tmp}"], "is a folder"),
        (["draft", "list", "--draft-model", "{tiny}", "--versions", "{file}"], "not a folder"),
        (["draft", "train", "--draft-model", "{tmp}/x.gguf", "--versions", "{tmp}/v", "--store", "{tmp}/s"], "unknown"),
        (["draft", "bench", "--teach", "target,target", "--work", "{tmp}/w", "--out", "{tmp}/w"], "twice"),
        (["draft", "bench", "--teach", "target,mimic", "--work", "{tmp}/w", "--out", "{tmp}/w"], "teach is one of"),
        (["draft", "train", "--teach", "mimic", "--versions", "{tmp}/v", "--store", "{tmp}/s"], "teach is one of"),
        (["serve", "--model", "{tmp}/no.gguf"], "unknown model"),
        (["serve", "--model", "{tiny}", "--engine", "vllm"], "unknown engine"),
        (["serve", "--model", "{tiny}", "--events-db", "{file}"], "not an SQLite database"),
        (["loadtest", "--url", "http://127.0.0.1:9", "--concurrency", "4,4"], "names '4' twice"),
        (["loadtest", "--servers", ",", "--out", "{tmp}/lt"], "empty item"),
        (["loadtest", "--url", "http://127.0.0.1:9", "--seed", "-1"], "--seed"),
        (["loadtest", "--url", "notaurl", "--out", "{tmp}/lt"], "http:// or https://"),
        (["loadtest", "--url", "http://127.0.0.1:9", "--servers", "llama-server"], "give one"),
        (["loadtest", "--url", "http://127.0.0.1:9", "--out", "{file}"], "not a folder"),
        (["client", "hi", "--draft-model", "{tiny}", "--server", "http://[::1"], "not a valid URL"),
        (["client", "hi", "--draft-model", "{tiny}", "--draft-versions", "{tmp}/v"], "no versions folder"),
        (["split-bench", "--clients", "1,1"], "twice"),
        (["split-bench", "--draft-tokens", "0"], "--draft-tokens"),
        (["split-bench", "--target-model", "{tmp}/no.gguf", "--out", "{tmp}/sp"], "unknown model"),
    ],
)
def test_bad_input_is_refused_before_any_work(args, message, tiny_gguf, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("not a folder, nor a database\n")
    values = {"{tiny}": tiny_gguf, "{tmp}": str(tmp_path), "{file}": str(file)}
    for key, value in values.items():
        args = [a.replace(key, value) for a in args]
    result = run_cli(*args, cwd=tmp_path)  # a default results folder would land here
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing was written


def test_refused_cascade_run_leaves_no_store_and_keeps_the_recorded_command(tiny_gguf, tmp_path):
    from codeaccel.cascade.store import GenerationStore

    missing = run_cli(
        "cascade", "run", "humaneval", "--models", str(tmp_path / "no.gguf"), "--out", str(tmp_path / "a")
    )
    assert missing.returncode == 2 and "unknown model" in missing.stderr and not (tmp_path / "a").exists()
    with GenerationStore(tmp_path / "b" / "store.sqlite") as store:
        store.set_meta("run_config", {"models": [], "dataset": "mbpp"})
        store.set_meta("command_run", "codeaccel cascade run mbpp")
    other = run_cli("cascade", "run", "humaneval", "--models", tiny_gguf, "--out", str(tmp_path / "b"))
    assert other.returncode == 2 and "other settings" in other.stderr
    with GenerationStore(tmp_path / "b" / "store.sqlite") as store:
        assert store.meta("command_run") == "codeaccel cascade run mbpp"


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE meta(a, b, c)",
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('schema_version', '\"x\"')",
    ],
)
def test_a_foreign_sqlite_file_as_the_cascade_store_is_a_one_line_error(sql, tiny_gguf, tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.executescript(sql)
    db.close()
    result = run_cli("cascade", "report", "humaneval", "--models", tiny_gguf, "--out", str(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "not a cascade store" in lines[0] or "store schema 'x'" in lines[0]


def test_rescore_with_nothing_to_rescore_changes_no_file(tiny_gguf, tmp_path):
    results = tmp_path / "run" / "results.jsonl"
    results.parent.mkdir()
    results.write_text('{"not": "a record of this run"\n')
    for out in (results.parent, tmp_path / "none"):
        result = run_cli("bench", "humaneval", "-m", tiny_gguf, "--limit", "1", "--rescore", "--out", str(out))
        assert result.returncode == 2 and "no stored results" in result.stderr and "Traceback" not in result.stderr
    assert results.read_text() == '{"not": "a record of this run"\n' and not (tmp_path / "none").exists()


def test_draft_bench_refused_for_an_unknown_package_records_no_settings(tiny_gguf, tmp_path):
    args = ["--draft-model", tiny_gguf, "--target-model", tiny_gguf, "--work", str(tmp_path / "w")]
    result = run_cli("draft", "bench", "--package", "no_such_package_here", *args, "--out", str(tmp_path / "w"))
    assert result.returncode == 2 and "not installed" in result.stderr
    assert not (tmp_path / "w").exists()  # a later run with the right package is not refused as "other settings"
