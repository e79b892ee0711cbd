"""The load test: its requests, its measurements against a live server, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from codeaccel.bench.load_servers import server_spec
from codeaccel.bench.load_test import SOURCES, fim_requests, run_load_test, typing_session
from codeaccel.errors import UserError
from codeaccel.serve.settings import ServeSettings
from live_server import LiveServer, pin_flat_cost_curve


def test_requests_are_real_code_cut_at_a_body_line_and_reproducible():
    requests = fim_requests(9, seed=3)
    assert [r.source.split("/")[0].split(":")[0] for r in requests] == [
        {"humaneval": "humaneval", "mbpp": "mbpp", "repo": "repo"}[s] for s in SOURCES
    ] * 3
    assert requests == fim_requests(9, seed=3) and requests != fim_requests(9, seed=4)
    for r in requests:
        assert r.middle.strip() and r.prefix.rstrip(" ").endswith("\n")
        compile(r.prefix + r.middle + r.suffix, r.source, "exec")  # the cut code is whole again
    with pytest.raises(UserError):
        fim_requests(0)


def test_more_requests_than_files_cut_files_again():
    requests = fim_requests(90, seed=0)  # 30 from click, which has fewer modules
    repo = [r for r in requests if r.source.startswith("repo:")]
    assert len(requests) == 90 and len(repo) == 30
    assert len({r.source for r in repo}) < 30  # some module gave two cuts


def test_a_typing_session_slides_the_gap_down_a_line_per_request():
    req = next(r for r in fim_requests(12, seed=1) if len((r.middle + r.suffix).splitlines()) >= 6)
    session = typing_session(req, 4)
    assert len(session) == 4 and session[0].prefix == req.prefix and session[0].middle == req.middle
    for before, after in zip(session, session[1:]):
        assert after.prefix.startswith(before.prefix) and after.prefix.count("\n") == before.prefix.count("\n") + 1
        assert before.prefix + before.middle + before.suffix == after.prefix + after.middle + after.suffix
    assert typing_session(req, 10**6)[-1].suffix == ""  # it stops where the file ends


def test_sessions_send_their_requests_in_turn_and_the_cache_keeps_prefixes(fim_gguf, tmp_path):
    """--session-steps: each client sends one session's requests one after another; with cache_prompt
    the server evaluates only what each prompt adds (its prefix-cache counters say so)."""
    settings = ServeSettings(  # room for whole prompts: a prompt trimmed at its front shares no prefix
        model=fim_gguf, method="autoregressive", parallel=2, ctx_size=4096, events_db=tmp_path / "e.db"
    )
    with LiveServer(settings) as live:
        (level,) = run_load_test(live.url, "tiny", fim_requests(2), [2], n_predict=4, session_steps=3)
        metrics = httpx.get(live.url + "/metrics").text
    hits = float(next(x for x in metrics.splitlines() if x.startswith("vllm:prefix_cache_hits_total ")).split()[1])
    assert level.errors == 0 and level.requests == sum(len(typing_session(r, 3)) for r in fim_requests(2))
    assert hits > 0


def test_a_level_against_a_live_server_counts_tokens_and_no_errors(fim_gguf, tmp_path):
    settings = ServeSettings(
        model=fim_gguf, method="autoregressive", parallel=2, ctx_size=512, events_db=tmp_path / "e.db"
    )
    with LiveServer(settings) as live:
        levels = run_load_test(live.url, "tiny", fim_requests(6), [1, 3], n_predict=8)
    assert [(lv.concurrency, lv.requests, lv.errors) for lv in levels] == [(1, 6, 0), (3, 6, 0)]
    for lv in levels:
        assert 0 < lv.generated_tokens <= 6 * 8 and lv.tokens_per_s > 0
        assert 0 < lv.ttft_p50_s <= lv.latency_p50_s <= lv.latency_p99_s


def test_predicted_outputs_go_through_openai_completions_with_the_middle(fim_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    pin_flat_cost_curve("tiny-fim")
    settings = ServeSettings(model=fim_gguf, method="context", parallel=2, ctx_size=512, events_db=tmp_path / "e.db")
    with LiveServer(settings) as live:
        (level,) = run_load_test(live.url, "tiny", fim_requests(4), [2], n_predict=8, predicted=True)
        drafted = [line for line in httpx.get(live.url + "/metrics").text.splitlines()
                   if line.startswith("vllm:spec_decode_num_draft_tokens_total ")]  # fmt: skip
    assert (level.requests, level.errors) == (4, 0) and 0 < level.generated_tokens <= 4 * 8
    assert float(drafted[0].split()[1]) > 0  # the predictions were drafted
    assert level.draft_tokens == float(drafted[0].split()[1])  # the level read the server's counters
    assert 0 <= level.accepted_tokens <= level.draft_tokens and level.prompt_tokens_looked_up > 0


def test_errors_are_counted_not_raised(tmp_path):
    (level,) = run_load_test("http://127.0.0.1:9", "nobody", fim_requests(2), [1], n_predict=4, timeout_s=2)
    assert level.errors == 2 and level.tokens_per_s == 0 and level.error_examples
    assert level.draft_tokens is None and level.prompt_tokens_cached is None  # no server, no counters


def test_the_command_starts_a_server_measures_and_writes_the_report(fim_gguf, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "codeaccel",
            "loadtest",
            "--servers",
            "codeaccel-autoregressive",
            "--model",
            fim_gguf,
            "--concurrency",
            "1,2",
            "--requests",
            "3",
            "--n-predict",
            "6",
            "--parallel",
            "2",
            "--ctx-size",
            "512",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "load_test.json").read_text())
    assert [(r["server"], r["concurrency"], r["errors"]) for r in doc["rows"]] == [
        ("codeaccel-autoregressive", 1, 0),
        ("codeaccel-autoregressive", 2, 0),
    ]
    assert all(r["method"] == r["server"] and r["n_problems"] == 3 and r["pass_at_1"] is None for r in doc["rows"])
    assert "| codeaccel-autoregressive | 2 |" in (tmp_path / "out" / "load_test.md").read_text()
    for row in doc["rows"]:  # the server's counters over each level: nothing drafted, every prompt looked up
        assert row["draft_tokens"] == 0 and 0 <= row["prompt_tokens_cached"] <= row["prompt_tokens_looked_up"]
        assert row["prompt_tokens_looked_up"] > 3 * 20  # three prompts of more than 20 tokens each


def test_bad_options_are_one_line_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "codeaccel", "loadtest", "--concurrency", "0,x", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--concurrency" in run.stderr
    with pytest.raises(UserError):
        server_spec("vllm", "m", 1, 512)


def test_a_server_without_kept_caches_is_started_so():
    kept = server_spec("codeaccel-autoregressive", "m", 2, 512, 1).command(8080)
    cold = server_spec("codeaccel-autoregressive", "m", 2, 512, 1, prefix_cache=False).command(8080)
    assert "--no-prefix-cache" not in kept and cold == [*kept, "--no-prefix-cache"]
