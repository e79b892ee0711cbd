"""The defects a whole-package review found, each pinned by a test that failed before its fix."""

import json
from pathlib import Path

import numpy as np
import pytest

from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DecodingStats
from codeaccel.decoding.verification import verify_tree
from codeaccel.engines.tokenizer import PROBE, check_same_tokenizer, engine_fingerprint
from codeaccel.errors import InternalError, UserError
from conftest import ScriptedEngine
from test_cli import run_cli

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def one_hot(rows, vocab=8):
    logits = np.zeros((len(rows), vocab), np.float32)
    for i, t in enumerate(rows):
        logits[i, t] = 5.0
    return logits


def test_a_fully_accepted_tree_branch_ends_with_a_bonus_token():
    """Nodes a(-1) b(0) c(-1): the target takes a, then b (a leaf), then adds x: b's branch was accepted in full."""
    a, b, c, x = 1, 2, 3, 4
    logits = one_hot([a, b, x, x])  # rows: roots, after a, after b, after c
    verdict = verify_tree([a, b, c], [-1, 0, -1], logits, SamplingParams(), np.random.default_rng(0))
    assert verdict.path == [0, 1] and verdict.tokens == [a, b, x]
    assert verdict.bonus  # was False: n_accepted (2) != nodes (3)
    rejected = verify_tree([a, b, c], [-1, 0, -1], one_hot([a, x, x, x]), SamplingParams(), np.random.default_rng(0))
    assert rejected.tokens == [a, x] and not rejected.bonus  # b was rejected: x is a recovered token


class Tokenizer(ScriptedEngine):
    """A scripted engine whose tokenizer can be told to split texts containing ``marker`` differently."""

    def __init__(self, marker: str | None = None):
        super().__init__(["<eos>", *"abcdefghijklmnopqrstuvwxyz"], {})
        self.marker = marker

    def tokenize(self, text, special=True):
        ids = [1 + (ord(ch) % 26) for ch in text]
        return ids[::-1] if self.marker and self.marker in text else ids


def test_same_tokenizer_means_the_same_fingerprint_everywhere():
    """The datastore fingerprint and the draft/target check are one definition (they used two probe texts)."""
    base, docstring_split, probe_split = Tokenizer(), Tokenizer(marker='"""Doc."""'), Tokenizer(marker="list[str]")
    assert '"""Doc."""' not in PROBE and "list[str]" in PROBE
    assert engine_fingerprint(docstring_split) == engine_fingerprint(base)
    check_same_tokenizer(docstring_split, base)  # same fingerprint: the same tokenizer for both uses
    assert engine_fingerprint(probe_split) != engine_fingerprint(base)
    with pytest.raises(UserError, match="tokenize text differently"):
        check_same_tokenizer(probe_split, base)


def test_stats_have_one_serialisation_that_reads_committed_records_back():
    """Every committed record's stats read back into DecodingStats and serialise to exactly what was stored."""
    checked = 0
    for results in sorted(BENCHMARKS.rglob("results.jsonl")):
        for line in results.read_text().splitlines()[:40]:
            stored = json.loads(line)["stats"]
            typed = DecodingStats.from_record(stored)
            assert (typed.to_record() if typed is not None else {}) == stored, results
            checked += 1
    assert checked > 100


def test_invariants_are_internal_errors_and_bad_input_is_a_user_error(scripted):
    with pytest.raises(InternalError):
        scripted.rewind(5)  # nothing cached: a caller's bug
    with pytest.raises(InternalError):
        scripted.eval([99])  # out of the vocabulary: the caller did not check its tokens
    with pytest.raises(UserError):
        SamplingParams(top_p=0)  # a request's value
    assert not issubclass(InternalError, UserError) and not issubclass(UserError, InternalError)


def test_an_ablation_alone_is_stored_and_reported_under_its_own_name(tiny_gguf, tmp_path):
    """--report-only with only retrieval-without-<part> found nothing: its records were stored as 'retrieval'."""
    env = {"CODEACCEL_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    root = tmp_path / "repo"
    root.mkdir()
    (root / "m.py").write_text("def add(a, b):\n    return a + b\n")
    ds = tmp_path / "ds"
    built = run_cli("index", "build", "repository", "--root", str(root), "-m", tiny_gguf, "--out", str(ds), env=env)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "run"
    args = ["bench", "humaneval", "-m", tiny_gguf, "--limit", "1", "--max-tokens", "8", "--out", str(out)]
    args += ["--method", "retrieval-without-cache", "--datastore", str(ds)]
    ran = run_cli(*args, env=env)
    assert ran.returncode == 0, ran.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["retrieval-without-cache"]
    again = run_cli(*args, "--report-only", env=env)
    assert again.returncode == 0, again.stderr
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["n_problems"]) for r in rows] == [("retrieval-without-cache", 1)]


def test_a_hybrid_whose_draft_fails_to_load_closes_its_retrieval_drafter(monkeypatch):
    import codeaccel.methods.registry as registry
    from codeaccel.engines.cost_curve import CostCurve
    from codeaccel.engines.pool import EnginePool
    from codeaccel.methods.registry import MethodOptions
    from codeaccel.retrieval.drafter import RetrievalDrafter

    closed = []
    monkeypatch.setattr(RetrievalDrafter, "close", lambda self: closed.append(self))
    monkeypatch.setattr(registry, "open_datastores", lambda target, names: [])
    flat = CostCurve("scripted", "scripted", None, 0, 1, [1, 2, 4], [0.01, 0.01, 0.01], [1.0, 1.0, 1.0])
    monkeypatch.setattr(registry, "cost_curve_for", lambda target: flat)

    def no_draft(*args, **kwargs):
        raise UserError("no such draft model")

    monkeypatch.setattr(registry, "_draft_engine", no_draft)
    with pytest.raises(UserError, match="no such draft"):
        registry.BUILDERS["hybrid"](ScriptedEngine(["<eos>", "a"], {1: 0}), MethodOptions(), EnginePool())
    assert len(closed) == 1 and isinstance(closed[0], RetrievalDrafter)


def test_usage_counts_cached_prompt_tokens_once_per_prompt_of_a_list():
    from types import SimpleNamespace

    from codeaccel.serve.formats import usage

    def choice(generated, cached):
        return SimpleNamespace(generation=SimpleNamespace(n_generated=generated, n_cached_prompt_tokens=cached))

    # two prompts (10 and 20 tokens), two choices each: prompt 0's choices had 4 and 6 cached, prompt 1's 15 and 0
    finished = [choice(3, 4), choice(5, 6), choice(2, 15), choice(1, 0)]
    got = usage(finished, 30, prompt_of=[0, 0, 1, 1])
    assert got["prompt_tokens_details"]["cached_tokens"] == 6 + 15  # was max over all choices: 15
    assert got["completion_tokens"] == 11 and got["total_tokens"] == 41
    assert usage(finished[:2], 10)["prompt_tokens_details"]["cached_tokens"] == 6  # one prompt, n choices: once
