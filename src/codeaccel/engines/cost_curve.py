"""The engine's cost curve: seconds to evaluate k tokens at once, relative to one decode step.

Speculative methods size their drafts from it: verifying k draft tokens costs
``relative[k-1]`` decode steps, so a draft pays only if it is expected to yield
more than that many tokens. Curves are saved per (engine, model) in the user cache
(``load_cost_curve`` finds them) and, for committing, as JSON/Markdown/PNG.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from codeaccel import machine
from codeaccel.engines.base import Engine
from codeaccel.errors import UserError
from codeaccel.models.registry import cache_dir

log = logging.getLogger(__name__)

TILE_TOLERANCE = 0.03  # a longer batch within 3% of a shorter one's cost dominates it (CostCurve.tiles)

# Real code to fill the context and to feed as "draft" tokens (any tokens would do
# for timing; code keeps the attention pattern realistic).
_FILLER = '''def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result
'''


@dataclass
class CostCurve:
    model: str
    engine: str
    dtype: str | None
    context_tokens: int
    repeats: int
    k: list[int]
    seconds: list[float]  # median seconds to evaluate k tokens, per k
    relative: list[float]  # seconds[k] / seconds[k=1]

    def cost(self, k: int) -> float:
        """Cost of evaluating k tokens, in decode steps, for planning (extrapolated linearly past the range).

        Never below one step: where a profile measured small batches cheaper than one
        token (hf bf16 here: C(2) = 0.69), verifications during decoding cost 0.9-1.4 of
        a plain step all the same (HumanEval, 1.5B), so that dip is not planned on.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        if k <= len(self.relative):
            return max(self.relative[k - 1], 1.0)
        return max(self.relative[-1] + self._tail_slope() * (k - len(self.relative)), self.relative[-1], 1.0)

    def _tail_slope(self) -> float:
        """Steps per extra token past the profile: a least-squares line through its last points (up to 8), never
        negative (two noisy last points, 4.1 then 4.0, would otherwise price huge batches as free)."""
        n = min(8, len(self.relative))
        if n < 2:
            return 1.0
        xs = list(range(len(self.relative) - n + 1, len(self.relative) + 1))
        ys = self.relative[-n:]
        mx, my = sum(xs) / n, sum(ys) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return max(slope, 0.0)

    def tiles(self, k_max: int, tolerance: float = TILE_TOLERANCE) -> list[int]:
        """The draft lengths k in 1..k_max worth verifying: no longer draft costs (nearly) as little.

        Verifying k drafts evaluates k + 1 tokens. Where a longer batch m costs at most
        ``1 + tolerance`` times as much as k + 1 (llama.cpp's repacked Q4_K kernels work on
        groups of 4 rows: on the Xeon VM C(3) = 1.91 but C(4) = 1.81 steps), k is
        dominated: the longer draft gives more tokens for the same price. Example, that
        curve: 2 (C(3)) is not a tile, 3 (C(4)) is.
        """
        return undominated([self.cost(k + 1) for k in range(k_max + 1)], tolerance)  # [k] = C(k + 1)


def undominated(cost_by_k: Sequence[float], tolerance: float = TILE_TOLERANCE) -> list[int]:
    """The draft lengths k >= 1 of ``cost_by_k`` (indexed by k) that no longer one costs within ``tolerance`` of."""
    return [
        k
        for k in range(1, len(cost_by_k))
        if all(cost_by_k[m] > (1 + tolerance) * cost_by_k[k] for m in range(k + 1, len(cost_by_k)))
    ]


def measure_cost_curve(
    engine: Engine, k_max: int = 32, repeats: int = 5, context_tokens: int = 256, dtype: str | None = None
) -> CostCurve:
    """Time ``eval`` of k = 1..k_max tokens after ``context_tokens`` cached tokens; keep the median."""
    if context_tokens + k_max > engine.n_ctx:
        raise UserError(f"context {context_tokens} + k_max {k_max} exceeds the engine's n_ctx {engine.n_ctx}")
    filler = engine.tokenize(_FILLER)
    stream = (filler * (1 + (context_tokens + k_max) // len(filler)))[: context_tokens + k_max]
    context, draft = stream[:context_tokens], stream[context_tokens:]
    engine.prefill(context)
    engine.eval(draft[:4])  # warm-up
    engine.rewind(context_tokens)
    samples: dict[int, list[float]] = {k: [] for k in range(1, k_max + 1)}
    for _ in range(repeats):
        for k in range(1, k_max + 1):
            t0 = time.perf_counter()
            engine.eval(draft[:k])
            samples[k].append(time.perf_counter() - t0)
            engine.rewind(context_tokens)
    seconds = [statistics.median(samples[k]) for k in range(1, k_max + 1)]
    return CostCurve(
        model=engine.model_name,
        engine=engine.kind,
        dtype=dtype if engine.kind == "hf" else None,
        context_tokens=context_tokens,
        repeats=repeats,
        k=list(range(1, k_max + 1)),
        seconds=[round(s, 6) for s in seconds],
        relative=[round(s / seconds[0], 4) for s in seconds],
    )


def _cache_path(engine: str, model: str, dtype: str | None) -> Path:
    suffix = f"-{dtype}" if dtype else ""
    return cache_dir() / "cost_curves" / f"{engine}-{model}{suffix}.json"


def save_cost_curve(curve: CostCurve, out_dir: Path | None = None, command: str = "") -> list[Path]:
    """Save to the user cache (for drafters) and, if given, as JSON/MD/PNG into out_dir."""
    doc = {**machine.provenance(command), **asdict(curve)}
    cached = _cache_path(curve.engine, curve.model, curve.dtype)
    paths = [cached]
    if out_dir is not None:
        paths.append(Path(out_dir) / f"cost_curve-{cached.stem}.json")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, indent=2) + "\n")
    if out_dir is not None:
        # not Path.with_suffix: model names contain dots ("qwen2.5", "llama.cpp")
        png, md = (Path(out_dir) / f"cost_curve-{cached.stem}.{ext}" for ext in ("png", "md"))
        _plot(curve, png)
        rows = "\n".join(
            f"| {k} | {1000 * s:.1f} | {r:.2f} |" for k, s, r in zip(curve.k, curve.seconds, curve.relative)
        )
        md.write_text(
            f"# Cost curve: {curve.model} on {curve.engine}{' ' + curve.dtype if curve.dtype else ''}\n\n"
            f"Command: `{command}`\n\nMachine: {doc['machine']['cores']} cores, {doc['machine']['cpu_model']}; "
            f"{doc['date']}. Context {curve.context_tokens} tokens, median of {curve.repeats}.\n\n"
            f"| k | ms | relative to k=1 |\n|---|---|---|\n{rows}\n"
        )
        paths += [png, md]
    return paths


def load_cost_curve(engine: str, model: str, dtype: str | None = None) -> CostCurve | None:
    """The saved curve for (engine, model), or None if ``codeaccel profile`` has not measured it."""
    path = _cache_path(engine, model, dtype if engine == "hf" else None)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    fields = CostCurve.__dataclass_fields__
    return CostCurve(**{k: v for k, v in doc.items() if k in fields})


def saved_curve_provenance(engine: str, model: str, dtype: str | None = None) -> dict | None:
    """The saved curve's origin (command, date, CPU) and costs, for benchmark results that depended on it."""
    path = _cache_path(engine, model, dtype if engine == "hf" else None)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    provenance = {k: doc.get(k) for k in ("command", "date", "context_tokens", "repeats", "relative")}
    machine_doc = doc.get("machine") or {}
    return {**provenance, "cpu": machine_doc.get("cpu_model"), "cores": machine_doc.get("cores")}


def cost_curve_for(engine: Engine) -> CostCurve:
    """The engine's saved curve, re-measured first where none is saved or it was measured on another CPU.

    Curves differ between CPUs (the AMD EPYC and Intel Xeon VMs this project runs on
    have different tiles and batch costs), so a curve profiled on another CPU model or
    core count is not used here: a quick profile on this machine replaces it in the
    user cache. (A VM may hide its host's exact model: "Intel(R) Xeon(R) Processor" is
    all the Xeon VMs here say, so two such hosts count as one.)
    """
    curve = load_cost_curve(engine.kind, engine.model_name, engine.dtype)
    here = (machine.cpu_model(), os.cpu_count())
    if curve is not None:
        saved = saved_curve_provenance(engine.kind, engine.model_name, engine.dtype) or {}
        there = (saved.get("cpu"), saved.get("cores"))
        if there == here:
            return curve
        if there[0] is None:  # a curve saved without its machine: nothing to compare, so it is used
            log.warning("the cost curve for %s on %s does not say which machine measured it", engine.model_name,
                        engine.kind)  # fmt: skip
            return curve
        log.warning("the cost curve for %s on %s was measured on %s (%s cores), not here (%s, %s cores): re-measuring",
                    engine.model_name, engine.kind, *there, *here)  # fmt: skip
    else:
        log.warning(
            "no cost curve for %s on %s: measuring a quick one (run `codeaccel profile %s` for a full one)",
            engine.model_name,
            engine.kind,
            engine.model_name,
        )
    context = min(256, engine.n_ctx // 2)
    k_max = min(32, engine.n_ctx - context)
    curve = measure_cost_curve(engine, k_max=k_max, repeats=3, context_tokens=context, dtype=engine.dtype)
    save_cost_curve(curve, command="(measured on first use)")
    engine.reset()
    return curve


def _plot(curve: CostCurve, path: Path) -> None:
    import matplotlib  # optional/heavy: imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(curve.k, curve.relative, marker="o", ms=3, label="measured")
    ax.plot(curve.k, curve.k, ls="--", color="grey", label="k sequential steps")
    ax.set_xlabel("tokens evaluated at once (k)")
    ax.set_ylabel("cost relative to one decode step")
    ax.set_ylim(0, max(curve.relative) * 1.15)
    ax.set_title(f"{curve.model} · {curve.engine}{' ' + curve.dtype if curve.dtype else ''}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
