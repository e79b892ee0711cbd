"""The personalization benchmark end to end on tiny models and a real project's code (click).

Contract: rows for the target alone, the untuned draft and each tuned one; held-out functions
come from other files than the training ones; a rerun resumes from the work folder (nothing
regenerated or retrained); the tuned draft's numbers are measured, not copied.
"""

from __future__ import annotations

import json

import pytest

from codeaccel.personalization.bench import PersonalizationBenchConfig, run_personalization_bench, to_markdown
from codeaccel.personalization.finetune import TuneConfig
from live_server import pin_flat_cost_curve


@pytest.fixture
def config(tiny_gguf, tiny_gguf_draft, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    pin_flat_cost_curve("tiny")
    return PersonalizationBenchConfig(package="click", n_problems=12, draft_model=tiny_gguf_draft,
                                      target_model=tiny_gguf, prompt_tokens=96, continuation_tokens=16,
                                      tune=TuneConfig(epochs=3, learning_rate=1e-2, max_seconds=60, max_tokens=112,
                                                      permute_qk=None))  # fmt: skip


def test_rows_before_and_after_tuning_and_a_resumed_rerun(config, tmp_path):
    stages = []
    doc = run_personalization_bench(config, tmp_path / "work", lambda s, d, n: stages.append(s.split(" (")[0]))
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == ["autoregressive", "draft-model-untuned", "draft-model-tuned-target",
                          "draft-model-tuned-accepted"]  # fmt: skip
    examples = [json.loads(line) for line in (tmp_path / "work" / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 12
    files = sorted({e["file"] for e in examples})
    held_files = set(files[2::3])
    assert rows["draft-model-untuned"]["n_problems"] == sum(e["file"] in held_files for e in examples) > 0
    for name in ("draft-model-untuned", "draft-model-tuned-target", "draft-model-tuned-accepted"):
        r = rows[name]
        assert 1.0 <= r["mean_accepted_len"] <= config.k + 1 and r["tokens_per_s"] > 0
        assert r["verifications"] > 0
    assert rows["draft-model-tuned-target"]["tune"]["steps"] > 0
    assert rows["draft-model-tuned-target"]["accepted_len_vs_untuned"] == pytest.approx(
        rows["draft-model-tuned-target"]["mean_accepted_len"] / rows["draft-model-untuned"]["mean_accepted_len"],
        abs=1e-3,
    )
    assert "tuning on target" in stages and "target continuations" in stages
    assert "| draft-model-tuned-target |" in to_markdown(doc)
    fields = {"dataset", "model", "engine", "method", "n_problems", "tokens_per_s", "pass_at_1"}  # the results format
    assert all(fields <= set(r) for r in doc["rows"])
    again = []
    doc2 = run_personalization_bench(config, tmp_path / "work", lambda s, d, n: again.append(s.split(" (")[0]))
    assert "tuning on target" not in again and not any(s.startswith("end to end") for s in again)
    assert [r["mean_accepted_len"] for r in doc2["rows"][1:]] == [r["mean_accepted_len"] for r in doc["rows"][1:]]
    # distillation added to the same work folder: the target's distributions computed for the
    # continuations already there (none regenerated), one tuning more, the other rows kept
    from dataclasses import replace

    doc3 = run_personalization_bench(replace(config, teach=("target", "distill"), train_acceptance=True, e2e=False),
                                     tmp_path / "work", lambda s, d, n: None)  # fmt: skip
    assert len((tmp_path / "work" / "examples.jsonl").read_text().splitlines()) == 12
    teachers = [json.loads(line) for line in (tmp_path / "work" / "teachers.jsonl").read_text().splitlines()]
    by_task = {e["task_id"]: e for e in examples}
    assert len(teachers) == 12 and all(len(t["ids"]) == len(by_task[t["task_id"]]["target"]) for t in teachers)
    rows3 = {r["method"]: r for r in doc3["rows"]}
    assert list(rows3) == ["autoregressive", "draft-model-untuned", "draft-model-tuned-target",
                           "draft-model-tuned-distill"]  # fmt: skip
    distilled, kept = rows3["draft-model-tuned-distill"], rows3["draft-model-tuned-target"]
    assert distilled["tune"]["steps"] > 0 and distilled["verifications"] > 0
    assert kept["mean_accepted_len"] == rows["draft-model-tuned-target"]["mean_accepted_len"]
    n_train = rows["draft-model-untuned"]["n_train"]
    for r in doc3["rows"][1:]:  # every draft also measured on the training examples (the held-out rows kept)
        assert r["train_acceptance"]["examples"] == n_train == 12 - r["n_problems"]
        assert 1.0 <= r["train_acceptance"]["mean_accepted_len"] <= config.k + 1
    assert "On the training examples" in to_markdown(doc3)
    assert all(fields <= set(r) for r in doc3["rows"])  # the results format without end-to-end timing too
    assert distilled["tokens_per_s"] is None and "| None |" not in to_markdown(doc3)


def test_a_work_folder_refuses_other_settings(config, tmp_path):
    from dataclasses import replace

    from codeaccel.errors import CodeaccelError
    from codeaccel.personalization.bench import _check_settings

    _check_settings(config, tmp_path)
    _check_settings(replace(config, teach=("target",), e2e=False), tmp_path)  # what to run may change
    with pytest.raises(CodeaccelError, match="other settings"):
        _check_settings(replace(config, continuation_tokens=99), tmp_path)


@pytest.mark.parametrize("line", [b'{"method": "autoregressive", "tok', b"[1, 2]", b'{"n": 1}', b"\xff\xfe"])
def test_a_rows_line_that_is_not_a_row_is_refused_naming_it_and_kept(line, config, tmp_path):
    from codeaccel.errors import UserError

    rows = tmp_path / "work" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_bytes(b'{"method": "autoregressive", "tokens_per_s": 9.0}\n\n' + line + b"\n")
    before = rows.read_bytes()
    with pytest.raises(UserError, match=r"rows\.jsonl:3 is not a row") as refused:
        run_personalization_bench(config, rows.parent, lambda *_: None)
    assert "\n" not in str(refused.value) and rows.read_bytes() == before


@pytest.mark.parametrize("text", [b"[]", b"{bad", b"\xff"])
def test_settings_that_are_not_a_json_object_are_a_user_error(text, config, tmp_path):
    from codeaccel.errors import UserError
    from codeaccel.personalization.bench import _check_settings

    (tmp_path / "settings.json").write_bytes(text)
    with pytest.raises(UserError, match="settings.json"):
        _check_settings(config, tmp_path)
    assert (tmp_path / "settings.json").read_bytes() == text


def test_a_function_split_holds_out_functions_beside_trained_ones_and_a_file_split_whole_files():
    from codeaccel.personalization.bench import Example, split_examples

    examples = [Example(f"p/{f}:{n}", f, (1,), (2,), (3,)) for f in ("a.py", "b.py", "c.py") for n in range(3)]
    train, held = split_examples(examples, "function", 3)
    assert [e.task_id for e in held] == ["p/a.py:2", "p/b.py:2", "p/c.py:2"]
    assert {e.file for e in held} <= {e.file for e in train} and len(train) == 6
    train, held = split_examples(examples, "file", 3)
    assert {e.file for e in held} == {"c.py"} and not {e.file for e in train} & {"c.py"}


def test_a_work_folder_from_before_the_split_setting_is_a_file_split(config, tmp_path):
    import dataclasses

    from codeaccel.errors import UserError
    from codeaccel.personalization.bench import _check_settings

    work = tmp_path / "work"
    work.mkdir()
    _check_settings(config, work)
    stored = json.loads((work / "settings.json").read_text())
    del stored["split"]  # as written before the setting existed
    (work / "settings.json").write_text(json.dumps(stored))
    _check_settings(config, work)  # the default (file) matches it
    with pytest.raises(UserError, match="other settings"):
        _check_settings(dataclasses.replace(config, split="function"), work)
    with pytest.raises(UserError, match="split"):
        dataclasses.replace(config, split="commit")


def test_a_cache_line_cut_short_is_cut_off_and_made_again(tmp_path):
    """A kill or a full disk mid-write leaves half a line: it is dropped (its record regenerated) and cut off the
    file, so the next append starts a line of its own instead of gluing onto it."""
    from codeaccel.personalization.bench import _cached_records

    cache = tmp_path / "examples.jsonl"
    cache.write_text(json.dumps({"task_id": "a", "x": 1}) + "\n" + '{"task_id": "b", "x"')
    assert [r["task_id"] for r in _cached_records(cache)] == ["a"]
    assert cache.read_text().endswith("\n") and cache.read_text().count("\n") == 1
    with cache.open("a") as out:
        out.write(json.dumps({"task_id": "b", "x": 2}) + "\n")
    assert [r["task_id"] for r in _cached_records(cache)] == ["a", "b"]
    assert _cached_records(tmp_path / "none.jsonl") == []
