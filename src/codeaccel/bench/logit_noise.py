"""How much an engine's logits move when the same tokens are evaluated in a batch.

Speculative verification evaluates k+1 tokens at once; autoregressive decoding one
at a time. Mathematically the logits are equal; numerically, batched kernels sum in
a different order (and bf16 rounds coarsely), so a greedy choice between two tokens
whose logits are closer than this noise can go either way. The benchmark measures
the noise once per engine, model and dtype, and counts a divergence from autoregressive
output as a *near tie* only when the target's top-1/top-2 margin at the divergence
is below ``tolerance`` (twice the largest change seen on any top-10 logit: the two
leading logits can move in opposite directions).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codeaccel.engines.base import Engine


def measure_logit_noise(engine: Engine, texts: Sequence[str], chunk: int = 8, top: int = 10) -> dict:
    """Evaluate the second half of each text one token at a time and in chunks; compare the logits."""
    diffs: list[float] = []  # per position: largest |Δ logit| among the top tokens
    margin_changes: list[float] = []  # per position: |Δ (top1 − top2)|
    for text in texts:
        tokens = engine.tokenize(text)
        half = len(tokens) // 2
        context, continuation = tokens[:half], tokens[half:]
        if not context or len(continuation) < chunk:
            continue
        engine.reset()
        engine.prefill(context)
        single = np.stack([engine.eval([t])[0] for t in continuation])  # [n, vocab]
        engine.rewind(len(context))
        batched = np.concatenate(
            [engine.eval(continuation[i : i + chunk]) for i in range(0, len(continuation), chunk)]
        )  # [n, vocab]
        top_ids = np.argsort(-single, axis=-1)[:, :top]  # [n, top]
        delta = np.abs(np.take_along_axis(single - batched, top_ids, axis=-1))  # [n, top]
        diffs.extend(delta.max(axis=-1).tolist())
        s_top = np.take_along_axis(single, top_ids[:, :2], axis=-1)
        b_top = np.take_along_axis(batched, top_ids[:, :2], axis=-1)
        margin_changes.extend(np.abs((s_top[:, 0] - s_top[:, 1]) - (b_top[:, 0] - b_top[:, 1])).tolist())
    engine.reset()
    if not diffs:
        raise ValueError("no text long enough to measure logit noise")
    max_diff = float(np.max(diffs))
    return {
        "engine": engine.kind,
        "model": engine.model_name,
        "dtype": engine.dtype,
        "positions": len(diffs),
        "chunk": chunk,
        "max_abs_logit_diff": round(max_diff, 6),
        "p99_abs_logit_diff": round(float(np.quantile(diffs, 0.99)), 6),
        "max_margin_change": round(float(np.max(margin_changes)), 6),
        "tolerance": round(2 * max_diff, 6),
    }


def load_or_measure(engine: Engine, texts: Sequence[str], out_dir: Path) -> dict:
    """The noise of this engine and model, measured once per results folder."""
    suffix = f"-{engine.dtype}" if engine.dtype else ""
    path = Path(out_dir) / f"logit_noise-{engine.kind}-{engine.model_name}{suffix}.json"
    stored = _read(path) if path.is_file() else None
    if stored is not None:
        return stored
    noise = measure_logit_noise(engine, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(noise, indent=2) + "\n")
    tmp.replace(path)  # whole or not at all: an interrupted write leaves no torn file
    return noise


def _read(path: Path) -> dict | None:
    """A stored measurement; None for one that cannot be read (measured again)."""
    try:
        noise = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return noise if isinstance(noise, dict) and isinstance(noise.get("tolerance"), int | float) else None


def first_divergence(engine: Engine, prompt: Sequence[int], reference: Sequence[int], other: Sequence[int]) -> dict:
    """Where ``other`` leaves ``reference`` (autoregressive output), and the target's logit margin there.

    The margin is top-1 minus top-2 of the target's logits for that position, from a
    fresh evaluation of prompt + the common prefix.
    """
    i = 0
    while i < min(len(reference), len(other)) and reference[i] == other[i]:
        i += 1
    logits = engine.prefill(list(prompt) + list(reference[:i]))  # [vocab]
    top2 = np.sort(logits)[-2:]
    out = {"position": i, "margin": round(float(top2[1] - top2[0]), 6)}
    if i < len(reference) and i < len(other):
        out["reference_token"] = int(reference[i])
        out["token"] = int(other[i])
        out["logit_gap"] = round(float(logits[reference[i]] - logits[other[i]]), 6)
    return out


def find_noise(out_dir: Path, engine: str, model: str, dtype: str | None = None) -> dict | None:
    """The noise measured for (engine, model, dtype) in a results folder, if any (a file that cannot be read
    is none): a bf16 run's tolerance never serves a float32 run of the same model."""
    for path in sorted(Path(out_dir).glob("logit_noise-*.json")):
        noise = _read(path)
        key = None if noise is None else (noise.get("engine"), noise.get("model"), noise.get("dtype"))
        if key == (engine, model, dtype):
            return noise
    return None
