"""The benchmark report's rows: speed-ups compare the same problems."""

from codeaccel.bench.report import summarize


def _record(method: str, task: str, tokens: int, seconds: float) -> dict:
    return {"dataset": "humaneval", "model": "m", "engine": "llama.cpp", "method": method, "variant": "",
            "task_id": task, "n_generated": tokens, "decode_s": seconds, "prefill_s": 0.1, "passed": True,
            "n_prompt_tokens": 10, "tokens": [1] * tokens, "config": {"temperature": 0.0}}  # fmt: skip


def test_a_speedup_compares_the_problems_both_rows_decoded():
    """Autoregressive decoded two problems, the method only the first (a run stopped part-way): its speed-up is
    over that problem alone, not against the other problem's speed too."""
    records = [_record("autoregressive", "T/0", 100, 10.0), _record("autoregressive", "T/1", 100, 2.0),
               _record("fast", "T/0", 100, 5.0)]  # fmt: skip
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["fast"]["speedup_vs_autoregressive"] == 2.0 and rows["fast"]["speedup_problems"] == 1
    assert rows["autoregressive"]["tokens_per_s"] == round(200 / 12.0, 3)  # the row itself: all it decoded
    assert rows["fast"]["identical_to_autoregressive"] == 1


def test_the_logit_noise_of_another_dtype_or_a_torn_file_is_not_used(tmp_path):
    import json

    from codeaccel.bench.logit_noise import find_noise

    for dtype, tolerance in (("bfloat16", 0.5), ("float32", 0.01)):
        noise = {"engine": "hf", "model": "m", "dtype": dtype, "tolerance": tolerance}
        (tmp_path / f"logit_noise-hf-m-{dtype}.json").write_text(json.dumps(noise))
    (tmp_path / "logit_noise-hf-m-float16.json").write_text('{"engine": "hf", "mod')  # an interrupted write
    assert find_noise(tmp_path, "hf", "m", "float32")["tolerance"] == 0.01  # not the bf16 file, first by name
    assert find_noise(tmp_path, "hf", "m", "float16") is None and find_noise(tmp_path, "llama.cpp", "m") is None
