"""hf engine: one step of 4 sequences at different cache lengths, one padded batch against one pass per sequence.

Run from the repository root: ``.venv/bin/python docs/benchmarks/cost_curves/hf-padded-sequences/measure.py``
(writes result.json beside this file). The 0.5B on hf (float32, from the bundled GGUF), caches of
24, 72, 144 and 240 tokens; a decode step (1 token each) and a verify step (4 tokens each, every row's
logits), mean of 16 and 8 repeats after one warm-up step.
"""

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import codeaccel.engines.hf_sequences as hf_sequences
from codeaccel.engines import load_engine, open_sequences
from codeaccel.machine import machine_info

MODEL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["def add(a, b):\n    return a + b\n" * k for k in (2, 6, 12, 20)]


def measure(engine, mode: str) -> dict:
    plan = hf_sequences.plan_batches
    if mode == "one pass per sequence":
        hf_sequences.plan_batches = lambda rows, **_: [[seq] for seq, _ in rows]
    try:
        with open_sequences(engine, n_seq_max=len(PROMPTS)) as seqs:
            opened, lengths = [seqs.open() for _ in PROMPTS], []
            for seq, prompt in zip(opened, PROMPTS):
                tokens = engine.tokenize(prompt)
                lengths.append(len(tokens))
                seqs.eval({seq: tokens}, all_logits=False)
            seqs.eval({seq: [13] for seq in opened}, all_logits=False)  # warm-up
            start = time.perf_counter()
            for _ in range(16):
                seqs.eval({seq: [13] for seq in opened}, all_logits=False)
            decode_s = (time.perf_counter() - start) / 16
            start = time.perf_counter()
            for _ in range(8):
                seqs.eval({seq: [13, 14, 15, 16] for seq in opened})
            verify_s = (time.perf_counter() - start) / 8
            passes = seqs.n_forward
    finally:
        hf_sequences.plan_batches = plan
    return {
        "mode": mode,
        "cache_tokens": lengths,
        "decode_step_s": round(decode_s, 4),
        "verify4_step_s": round(verify_s, 4),
        "forward_passes": passes,
    }


def main() -> None:
    with load_engine(MODEL, "hf", n_ctx=2048, dtype="float32") as engine:
        rows = [measure(engine, "padded batch"), measure(engine, "one pass per sequence")]
    result = {
        "command": ".venv/bin/python docs/benchmarks/cost_curves/hf-padded-sequences/measure.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": MODEL,
        "engine": "hf float32",
        "machine": machine_info(),
        "rows": rows,
    }
    out = Path(__file__).with_name("result.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
