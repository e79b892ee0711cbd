"""Draft seconds per token, full output layer against reduced draft vocabularies, interleaved.

Usage (from the repository root, nothing else running):

    .venv/bin/python docs/benchmarks/draft_vocab/measure_draft_cost.py docs/benchmarks/draft_vocab/draft_cost

For each round and each HumanEval prompt, every engine (the bundled 0.5B with its full
151,936-token output layer, and the same model cut to each size in SIZES) prefills the
prompt and then decodes TOKENS tokens greedily one at a time, as a drafter does; the
time per token is the whole ``eval`` call (llama.cpp's decode, the embeddings read
from the original file, the logits scattered back to the full vocabulary) plus the
argmax. Engines alternate within every round, so drift touches all alike. Also
reported: the share of the 1.5B target's own greedy HumanEval tokens (the committed
autoregressive outputs of ``docs/benchmarks/context/humaneval-llama.cpp``) inside each
vocabulary, the most the reduced draft can propose.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.harness import build_prompt
from codeaccel.engines import load_engine
from codeaccel.machine import machine_info
from codeaccel.methods.registry import ranked_draft_vocabulary

DRAFT = "qwen2.5-coder-0.5b-instruct"
TARGET = "qwen2.5-coder-1.5b-instruct"
SIZES = (65536, 32768, 16384, 8192)
ROUNDS, PROMPTS, TOKENS = 5, 4, 32
OUTPUTS = Path("docs/benchmarks/context/humaneval-llama.cpp/results.jsonl")


def decode_seconds_per_token(engine, prompt: list[int]) -> list[float]:
    engine.reset()
    logits = engine.prefill(prompt)
    token, out = int(np.argmax(logits)), []
    for _ in range(TOKENS):
        start = time.perf_counter()
        token = int(np.argmax(engine.eval([token])[-1]))
        out.append(time.perf_counter() - start)
    return out


def results_fields(vocabulary: int, ms_per_token: float) -> dict:
    """The fields every benchmark row carries: one-token greedy decoding of the draft on HumanEval prompts.

    No answer is completed (TOKENS tokens each), so pass@1 is not measured here.
    """
    model = DRAFT if vocabulary == 151936 else f"{DRAFT}-vocab{vocabulary}"
    return {
        "dataset": "humaneval",
        "model": model,
        "engine": "llama.cpp",
        "method": "autoregressive",
        "n_problems": PROMPTS,
        "pass_at_1": None,
        "tokens_per_s": round(1000 / ms_per_token, 2),
    }


def main(out_dir: Path) -> None:
    target_tokens = np.array(
        [
            t
            for line in OUTPUTS.open()
            for r in [json.loads(line)]
            if r["method"] == "autoregressive"
            for t in r["tokens"]
        ]
    )
    with load_engine(TARGET) as target:
        vocabularies = {n: ranked_draft_vocabulary(target, DRAFT, n) for n in SIZES}
        prompts = [build_prompt(target, p) for p in load_problems("humaneval", PROMPTS)]
    engines = {"full": load_engine(DRAFT)} | {n: load_engine(DRAFT, vocabulary=v) for n, v in vocabularies.items()}
    times: dict = {name: [] for name in engines}
    try:
        for r in range(ROUNDS):
            for prompt in prompts:
                for name, engine in engines.items():
                    times[name] += decode_seconds_per_token(engine, prompt)
            print(f"round {r + 1}/{ROUNDS}", {k: round(1000 * statistics.median(v), 1) for k, v in times.items()})
    finally:
        for engine in engines.values():
            engine.close()
    full_ms = 1000 * statistics.median(times["full"])
    rows = []
    for name, seconds in times.items():
        ms = 1000 * statistics.median(seconds)
        kept = 151936 if name == "full" else name
        coverage = 1.0 if name == "full" else float(np.isin(target_tokens, vocabularies[name].token_ids).mean())
        rows.append(
            {
                **results_fields(kept, ms),
                "vocabulary": kept,
                "ms_per_token_median": round(ms, 2),
                "ms_per_token_mean": round(1000 * statistics.mean(seconds), 2),
                "vs_full": round(ms / full_ms, 3),
                "target_token_coverage": round(coverage, 4),
                "tokens_timed": len(seconds),
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python docs/benchmarks/draft_vocab/measure_draft_cost.py " + str(out_dir)
    corpus = next(iter(vocabularies.values())).corpus
    record = {"command": command, "machine": machine_info(), "draft": DRAFT, "ranked_by": corpus, "rows": rows}
    (out_dir / "draft_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Draft seconds per token, full and reduced output layers",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_info()['cores']} cores, {machine_info()['cpu_model']}",
        "",
        f"Draft {DRAFT}; vocabularies ranked by {corpus}; {ROUNDS} rounds x {PROMPTS} HumanEval prompts x "
        f"{TOKENS} greedy tokens per engine, interleaved. Coverage: share of the target's {len(target_tokens)} "
        "greedy HumanEval tokens (first 20 problems) inside the vocabulary.",
        "",
        "| vocabulary | ms/token (median) | ms/token (mean) | vs full | target-token coverage |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['vocabulary']} | {row['ms_per_token_median']} | {row['ms_per_token_mean']} | "
            f"{row['vs_full']:.3f} | {row['target_token_coverage']:.2%} |"
        )
    (out_dir / "draft_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
