"""Tune, validate, then promote; draft versions; adapters equal on both engines (tiny models).

Contract: a version is promoted only when its mean accepted length on held-out completions is
strictly above the live draft's (a worse draft is never promoted); versions are kept, and
rollback returns to the one before (then the base model); the GGUF adapter of a tuning makes
llama.cpp compute what transformers computes with the peft adapter.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from codeaccel.engines import load_engine
from codeaccel.errors import CodeaccelError
from codeaccel.personalization.acceptance import AcceptanceStats
from codeaccel.personalization.finetune import TrainingExample, TuneConfig, finetune
from codeaccel.personalization.loop import LoopConfig, run_tuning, should_promote, split
from codeaccel.personalization.store import Accepted, open_store
from codeaccel.personalization.versions import DraftVersions

PROMPTS = ["def add(a, b):\n", "import json\n", "class Decoder:\n", "    for i in range(", "x = [1, 2]\n",
           "def parse(text):\n", "    return ", "if __name__ == ", "with open(path) as f:\n", "try:\n"]  # fmt: skip


def _stats(committed, verifications):
    return AcceptanceStats(examples=1, verifications=verifications, committed_tokens=committed)


def test_only_a_strictly_better_draft_is_promoted():
    live = _stats(30, 10)  # 3.0 tokens per verification
    assert should_promote(_stats(31, 10), live)
    assert not should_promote(_stats(30, 10), live)  # as good is not better
    assert not should_promote(_stats(20, 10), live)
    assert not should_promote(AcceptanceStats(), AcceptanceStats())  # measured on nothing


def test_versions_promote_rollback_and_refuse_what_is_not_ready(tmp_path):
    versions = DraftVersions(tmp_path)
    v1, v2 = versions.create(), versions.create()
    assert (v1.name, v2.name) == ("v1", "v2") and versions.live() is None
    (v1.path / "adapter.gguf").write_bytes(b"x")  # written, but its tuning never validated it
    with pytest.raises(CodeaccelError, match="not validated"):
        versions.promote("v1")
    versions.record("v1", status="validated")
    (v1.path / "adapter.gguf").unlink()
    with pytest.raises(CodeaccelError, match="no adapter"):
        versions.promote("v1")
    for v in (v1, v2):
        (v.path / "adapter.gguf").write_bytes(b"x")
        versions.record(v.name, status="validated")
    versions.promote("v1")
    versions.promote("v2")
    assert versions.live().name == "v2"
    assert versions.rollback().name == "v1" and versions.live().name == "v1"
    assert versions.live().record["status"] == "live"  # live again, no longer superseded
    assert versions.rollback() is None and versions.live() is None  # the base model
    with pytest.raises(CodeaccelError):
        versions.rollback()
    with pytest.raises(CodeaccelError, match="no draft version"):
        versions.promote("v9")
    versions.record("v1", last_accepted_id=7)
    assert versions.last_trained_id() == 7 and [v.name for v in versions.list()] == ["v1", "v2"]
    assert DraftVersions(tmp_path).list()[1].record["status"] == "rolled back"  # read back from disk
    (tmp_path / "v3").mkdir()  # a crash after the folder, before its record
    assert versions.create().name == "v4"


def test_a_promotion_supersedes_the_live_version(tmp_path):
    versions = DraftVersions(tmp_path)
    for _ in range(2):
        v = versions.create()
        (v.path / "adapter.gguf").write_bytes(b"x")
        versions.record(v.name, status="validated")
    versions.promote("v1")
    versions.promote("v2")
    assert [v.record["status"] for v in versions.list()] == ["superseded", "live"]


def test_a_candidate_is_not_promoted_over_a_draft_it_was_not_compared_with(tmp_path):
    from codeaccel.personalization.versions import LiveChanged

    versions = DraftVersions(tmp_path)
    for _ in range(2):
        v = versions.create()
        (v.path / "adapter.gguf").write_bytes(b"x")
        versions.record(v.name, status="validated")
    versions.promote("v1")  # by hand, while v2 was being tuned and validated against the base model
    with pytest.raises(LiveChanged, match="validated against the base model, but v1 is live"):
        versions.promote("v2", expected_live=None)
    assert versions.live().name == "v1"
    assert versions.promote("v2", expected_live="v1").name == "v2"


def test_the_same_prompt_is_never_both_trained_on_and_held_out(accepted):
    from codeaccel.personalization.loop import held_out, split

    train, held = split(accepted.items(), 5)
    assert held and train and not {s.item.prompt for s in train} & {s.item.prompt for s in held}
    assert len(held) == sum(held_out(s, 5) for s in accepted.items())
    twice = [replace(s, id=s.id + 100) for s in held[:1] + train[:1]]  # the same prompts accepted again
    assert split(twice, 5) == ([twice[1]], [twice[0]])


def test_a_version_left_training_by_a_killed_tuning_reads_interrupted(tmp_path):
    versions = DraftVersions(tmp_path)
    versions.create()
    with versions.training():  # a tuning running now: its version is training
        assert versions.tuning_running() and versions.list()[0].record["status"] == "training"
    assert not versions.tuning_running()
    assert versions.list()[0].record["status"] == "interrupted"  # nobody trains it any more
    with pytest.raises(CodeaccelError, match="not validated"):
        versions.promote("v1")
    (tmp_path / "train.lock").chmod(0o444)  # a reader that cannot write the folder still probes it
    assert not versions.tuning_running()


def test_a_readers_probe_is_waited_out_not_taken_for_a_running_tuning(tmp_path):
    import fcntl
    import threading

    versions = DraftVersions(tmp_path)
    with versions.training():
        pass  # the lock file exists from now on
    reader = open(tmp_path / "train.lock")
    fcntl.flock(reader, fcntl.LOCK_SH)  # a list() probing at the instant the tuning starts
    threading.Timer(0.3, reader.close).start()
    with versions.training():  # waits the probe out instead of refusing
        assert versions.tuning_running()


def test_a_failed_tuning_records_why_and_keeps_no_half_written_version(accepted, tiny_gguf, tmp_path, monkeypatch):
    import codeaccel.personalization.loop as loop

    def broken(model, examples, config, folder, progress):
        (folder / "adapter.gguf").write_bytes(b"half")  # what a tuning wrote before it failed
        raise MemoryError("out of memory")

    monkeypatch.setattr(loop, "finetune", broken)
    versions = DraftVersions(tmp_path / "drafts")
    config = LoopConfig(threshold=1, continuation_tokens=4, teach="accepted")
    with pytest.raises(MemoryError):
        run_tuning(accepted, versions, tiny_gguf, tiny_gguf, config)
    (failed,) = versions.list()
    assert failed.record["status"] == "failed" and failed.record["error"] == "MemoryError: out of memory"
    with pytest.raises(CodeaccelError, match="failed"):
        versions.promote(failed.name)
    assert not failed.path.exists() and versions.live() is None
    assert versions.create().name == "v2"  # the failed number is not reused


def test_a_tuning_reads_only_the_newest_accepted_completions(accepted, tiny_gguf, tmp_path, monkeypatch):
    import codeaccel.personalization.loop as loop

    seen = {}

    def stop_at_training(model, examples, config, folder, progress):
        seen["train"] = len(examples)
        raise MemoryError("stop here")

    monkeypatch.setattr(loop, "finetune", stop_at_training)
    config = LoopConfig(threshold=1, continuation_tokens=4, teach="accepted", max_items=12)
    with pytest.raises(MemoryError):
        run_tuning(accepted, DraftVersions(tmp_path / "drafts"), tiny_gguf, tiny_gguf, config)
    newest = accepted.items()[-12:]
    assert seen["train"] == len(split(newest, config.held_out_every)[0])  # 12 of the 30, split as always


def test_the_gguf_adapter_computes_what_peft_computes(tiny_gguf, tmp_path):
    """transformers reads the tiny llama GGUF (its q/k rows un-permuted); the adapter is permuted back."""
    hf = load_engine(tiny_gguf, "hf", dtype="float32", n_ctx=256)
    cpp = load_engine(tiny_gguf, n_ctx=256)
    try:
        examples = [TrainingExample(tuple(hf.tokenize(p)), tuple(hf.tokenize(" return 1\n"))) for p in PROMPTS]
        report = finetune(hf.model, examples, TuneConfig(epochs=3, learning_rate=3e-2), tmp_path)
        tokens = cpp.tokenize("def parse(text):\n    return json")
        base = cpp.eval(tokens)
        cpp.reset()
        hf.set_lora(report.adapter_dir)
        cpp.set_lora(report.gguf_path)
        tuned_hf, tuned_cpp = hf.eval(tokens), cpp.eval(tokens)
        scale = np.abs(tuned_hf).max()
        assert np.abs(tuned_hf - base).max() > 0.05 * scale  # the tuning moved the model
        np.testing.assert_allclose(tuned_cpp, tuned_hf, atol=0.01 * scale)
    finally:
        cpp.close()
        hf.close()


@pytest.fixture
def accepted(tmp_path):
    store = open_store(tmp_path / "accepted.sqlite")
    for i in range(3):  # each prompt in three files: similar contexts, not the same prompt (those never straddle)
        for p in PROMPTS:
            store.add(Accepted(f"# file {i}\n{p}", " pass\n", repository="demo"))
    yield store
    store.close()


@pytest.mark.parametrize("teach", ["target", "distill"])
def test_a_tuning_turn_is_validated_and_promoted_only_if_better(accepted, tiny_gguf, tiny_gguf_draft, tmp_path, teach):
    versions = DraftVersions(tmp_path / "drafts")
    config = LoopConfig(threshold=20, continuation_tokens=16, teach=teach,
                        tune=TuneConfig(epochs=8, learning_rate=2e-2, max_seconds=900))  # fmt: skip
    # (the epochs stop it, ~40 s alone: a time budget it could reach on a loaded machine makes the result vary)
    stages = set()
    result = run_tuning(accepted, versions, tiny_gguf_draft, tiny_gguf, config, lambda s, d, n: stages.add(s[:8]))
    n_held = len(split(accepted.items(), config.held_out_every)[1])
    assert result is not None and result.n_held_out == n_held and result.n_train == 30 - n_held
    assert {"target c", "fine-tun", "validati"} <= stages
    assert result.promoted == (result.candidate.mean_accepted_len > result.live.mean_accepted_len)
    assert result.promoted  # trained on the target's own continuations of the other prompts
    assert versions.live().name == result.version.name == "v1"
    record = versions.live().record
    assert record["n_train"] == 30 - n_held and record["last_accepted_id"] == 30 and record["tune"]["steps"] > 0
    assert record["teach"] == teach
    assert run_tuning(accepted, versions, tiny_gguf_draft, tiny_gguf, config) is None  # nothing new since


def test_a_worse_draft_is_never_promoted(accepted, tiny_gguf, tiny_gguf_draft, tmp_path):
    """Against the live tuned version, not the base model: v1 (tuned well) is live; a candidate ruined by a huge
    learning rate is measured on its own adapter, found worse than v1, and left validated, not promoted."""
    versions = DraftVersions(tmp_path / "drafts")
    good = LoopConfig(threshold=20, continuation_tokens=16, tune=TuneConfig(epochs=8, learning_rate=2e-2,
                                                                            max_seconds=900))  # fmt: skip
    first = run_tuning(accepted, versions, tiny_gguf_draft, tiny_gguf, good)
    assert first.promoted and versions.live().name == "v1"
    ruin = LoopConfig(threshold=1, continuation_tokens=16, teach="accepted",
                      tune=TuneConfig(epochs=4, learning_rate=1.0, max_seconds=60))  # fmt: skip
    result = run_tuning(accepted, versions, tiny_gguf_draft, tiny_gguf, ruin, force=True)
    assert result.live_name == "v1"  # measured against the live tuned version, as it measured when promoted:
    assert result.live.mean_accepted_len == pytest.approx(first.candidate.mean_accepted_len)
    assert result.candidate.mean_accepted_len < result.live.mean_accepted_len  # its own adapter was measured
    assert not result.promoted and versions.live().name == "v1"
    assert versions.list()[1].record["status"] == "validated"


def test_draft_commands_train_list_promote_and_rollback(accepted, tiny_gguf, tiny_gguf_draft, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "versions"
    common = ["--draft-model", tiny_gguf_draft, "--versions", str(folder)]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "codeaccel", "draft", *args], capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    trained = cli("train", *common, "--target-model", tiny_gguf, "--store", str(accepted.path), "--threshold", "5",
                  "--epochs", "6")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "v1" in trained.stdout and "mean accepted length" in trained.stdout
    listed = cli("list", *common)
    assert listed.returncode == 0 and "v1" in listed.stdout
    live = DraftVersions(folder).live()
    if live is None:  # not better: promoting by hand still works
        assert cli("promote", "v1", *common).stdout.strip() == "live: v1"
    assert cli("rollback", *common).stdout.strip() == "live: base"
    refused = cli("rollback", *common)
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
    assert cli("promote", "v7", *common).returncode == 2
    assert cli("train", *common, "--teach", "guess").returncode == 2


@pytest.mark.parametrize(
    "registry",
    [
        "[]",
        "{bad json",
        "{}",
        '{"live": null, "history": [], "versions": []}',
        '{"live": "v1", "history": [], "versions": {}}',
        '{"live": null, "history": ["v2"], "versions": {"v1": {}}}',
        '{"live": null, "history": [], "versions": {"x": {}}}',
        '{"live": null, "history": [], "versions": {"v1": {"last_accepted_id": "7"}}}',
    ],
)
def test_a_versions_registry_of_another_shape_is_a_user_error_and_kept(registry, tmp_path):
    from codeaccel.errors import UserError

    (tmp_path / "versions.json").write_text(registry)
    versions = DraftVersions(tmp_path)
    for read in (versions.list, versions.live, versions.last_trained_id, versions.create, versions.rollback):
        with pytest.raises(UserError, match="versions.json"):
            read()
    assert (tmp_path / "versions.json").read_text() == registry  # nothing written over it
