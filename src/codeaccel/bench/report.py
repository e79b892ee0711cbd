"""Benchmark results: summary rows, and the JSON / Markdown / PNG files that hold them.

The JSON results format (stable; later issues add keys, none renames these):
top-level ``command`` (the exact command line), ``machine``, ``date``, ``config``
and ``rows``, one row per (dataset, model, engine, method) with at least
``dataset, model, engine, method, n_problems, tokens_per_s, pass_at_1`` and, where
an autoregressive row of the same run exists, ``speedup_vs_autoregressive`` (over the problems both
rows decoded, ``speedup_problems`` of them) and ``identical_to_autoregressive``.

``tokens_per_s`` is generated tokens over decode seconds, summed over problems
(prefill excluded; ``end_to_end_tokens_per_s`` includes it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from codeaccel import machine
from codeaccel.decoding.stats import DecodingStats
from codeaccel.methods.registry import uses_cost_curve

GROUP = ("dataset", "model", "engine", "method", "variant")  # variant: the method's settings, e.g. its draft model


def _group(r: dict) -> tuple:
    return tuple(r.get(k, "") for k in GROUP)


def summarize(records: list[dict], noise: dict | None = None) -> list[dict]:
    """One row per (dataset, model, engine, method). ``noise``: the target's measured logit noise
    (:mod:`codeaccel.bench.logit_noise`), which separates near-tie divergences from clear ones."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[_group(r)].append(r)
    rows = []
    for key, rs in groups.items():
        n_gen = sum(r["n_generated"] for r in rs)
        decode_s = sum(r["decode_s"] for r in rs)
        cold = [r for r in rs if not r.get("prefill_shared")]  # records that paid their own prefill
        prefill_s = sum(r["prefill_s"] for r in cold)
        cold_s = sum(r["decode_s"] + r["prefill_s"] for r in cold)
        rows.append(
            {
                **dict(zip(GROUP, key)),
                "n_problems": len(rs),
                "n_passed": sum(bool(r["passed"]) for r in rs),
                "pass_at_1": _pass_at_1(rs),
                "tokens_per_s": round(n_gen / decode_s, 3) if decode_s else 0.0,
                "end_to_end_tokens_per_s": (round(sum(r["n_generated"] for r in cold) / cold_s, 3) if cold_s else None),
                "generated_tokens": n_gen,
                "mean_generated_tokens": round(n_gen / len(rs), 1),
                "mean_prompt_tokens": round(sum(r["n_prompt_tokens"] for r in rs) / len(rs), 1),
                "mean_prefill_ms": round(1000 * prefill_s / len(cold), 1) if cold else None,
                "decode_s": round(decode_s, 3),
                **_similarity_columns(rs),
                **_solution_errors(rs),
                **_speculation_columns(rs, n_gen),
            }
        )
    _compare_to_autoregressive(rows, groups, noise)
    return rows


def _decode_speed(rs: list[dict], task_ids: set[str]) -> float | None:
    """Generated tokens per second of decoding over the records of ``task_ids``."""
    chosen = [r for r in rs if r["task_id"] in task_ids]
    decode_s = sum(r["decode_s"] for r in chosen)
    return sum(r["n_generated"] for r in chosen) / decode_s if decode_s else None


def _pass_at_1(rs: list[dict]) -> float | None:
    """Share of problems whose tests passed; None for a dataset without tests."""
    tested = [r for r in rs if r["passed"] is not None]
    return round(sum(bool(r["passed"]) for r in tested) / len(tested), 4) if tested else None


def _solution_errors(rs: list[dict]) -> dict:
    """Completions that raised before any official test ran (e.g. the model's own example asserts)."""
    scored = [r for r in rs if "setup_status" in r]
    if not scored or len(scored) < len(rs):
        return {}
    return {"solution_errors": sum(r["setup_status"] != "ok" for r in scored)}


def _similarity_columns(rs: list[dict]) -> dict:
    if not any("edit_similarity" in r for r in rs):
        return {}
    scored = [r for r in rs if "edit_similarity" in r]
    return {
        "exact_match": round(sum(bool(r["exact_match"]) for r in scored) / len(scored), 4),
        "edit_similarity": round(sum(r["edit_similarity"] for r in scored) / len(scored), 4),
    }


def _speculation_columns(rs: list[dict], n_gen: int) -> dict:
    """Target seconds per token, and the draft/accept counters of methods that log them."""
    stats = [DecodingStats.from_record(r.get("stats")) for r in rs]
    cols: dict = {}
    if n_gen and all(s is not None for s in stats):
        cols["target_s_per_token"] = round(sum(s.target_s for s in stats) / n_gen, 6)
    spec = [s.speculation for s in stats if s is not None and s.speculation is not None]
    if spec:
        drafts = sum(s.drafts for s in spec)
        steps = sum(s.steps for s in stats if s is not None and s.speculation is not None)
        drafted = sum(s.drafted_tokens for s in spec)
        accepted = sum(s.accepted_tokens for s in spec)
        cols["mean_accepted_len"] = round(1 + accepted / drafts, 3) if drafts else None
        cols["acceptance_rate"] = round(accepted / drafted, 4) if drafted else None
        cols["mean_draft_len"] = round(drafted / drafts, 2) if drafts else None
        cols["share_of_steps_drafted"] = round(drafts / steps, 4) if steps else None
        cols["tokens_per_target_eval"] = round(n_gen / steps, 3) if steps else None
    return cols


def _compare_to_autoregressive(rows: list[dict], groups: dict[tuple, list[dict]], noise: dict | None) -> None:
    """Speed-up over the autoregressive row of the same run; for greedy runs, how many outputs match it.

    A non-identical output is a near tie when the target's top-1/top-2 margin at the
    first divergence is below the measured noise tolerance, else a clear divergence.
    """
    tolerance = noise["tolerance"] if noise else None
    for row in rows:
        ar_key = (row["dataset"], row["model"], row["engine"], "autoregressive", "")
        if ar_key not in groups or row["method"] == "autoregressive":
            continue
        mine = groups[_group(row)]
        shared = {r["task_id"] for r in mine} & {r["task_id"] for r in groups[ar_key]}
        ours, theirs = _decode_speed(mine, shared), _decode_speed(groups[ar_key], shared)
        if ours and theirs:  # over the problems both decoded: a row with fewer problems is no other set's ratio
            row["speedup_vs_autoregressive"] = round(ours / theirs, 3)
            row["speedup_problems"] = len(shared)
        if any(r["config"]["temperature"] > 0 for r in mine):
            continue  # sampled outputs are compared by distribution, not token by token
        ar_tokens = {r["task_id"]: r["tokens"] for r in groups[ar_key]}
        compared = [r for r in mine if r["task_id"] in ar_tokens]
        different = [r for r in compared if r["tokens"] != ar_tokens[r["task_id"]]]
        row["identical_to_autoregressive"] = len(compared) - len(different)
        if tolerance is not None:
            margins = [r.get("divergence", {}).get("margin") for r in different]
            row["divergences_at_near_ties"] = sum(1 for m in margins if m is not None and m < tolerance)
            row["divergences_at_clear_margin"] = sum(1 for m in margins if m is not None and m >= tolerance)
            row["divergences_unmeasured"] = sum(1 for m in margins if m is None)
            row["near_tie_tolerance"] = tolerance


COLUMNS = [
    ("dataset", "dataset"),
    ("model", "model"),
    ("engine", "engine"),
    ("method", "method"),
    ("variant", "variant"),
    ("n_problems", "problems"),
    ("pass_at_1", "pass@1"),
    ("solution_errors", "solution errors"),
    ("edit_similarity", "edit sim"),
    ("tokens_per_s", "tok/s"),
    ("speedup_vs_autoregressive", "speed-up"),
    ("identical_to_autoregressive", "identical"),
    ("divergences_at_near_ties", "near ties"),
    ("divergences_at_clear_margin", "clear divergences"),
    ("mean_accepted_len", "accepted len"),
    ("mean_draft_len", "draft len"),
    ("share_of_steps_drafted", "drafted steps"),
    ("target_s_per_token", "target ms/tok"),
    ("mean_generated_tokens", "gen tok"),
    ("mean_prefill_ms", "prefill ms"),
]


def markdown_table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            if k == "pass_at_1" and v not in ("", None):
                v = f"{100 * v:.1f}%"
            elif k == "speedup_vs_autoregressive" and v != "":
                v = f"{v:.2f}×"
            elif k == "target_s_per_token" and v != "":
                v = f"{1000 * v:.1f}"
            elif k == "share_of_steps_drafted" and v not in ("", None):
                v = f"{100 * v:.0f}%"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bars per row: decode tokens/s, pass@1, and target ms per token where measured."""
    import matplotlib  # optional/heavy: imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dataset']}\n{r['model']}\n{r['engine']} {r['method']}\n{r.get('variant', '')}" for r in rows]
    panels = [("tokens_per_s", "tokens / s (decode)", 1, "tab:blue"), ("pass_at_1", "pass@1 (%)", 100, "tab:green")]
    if any(r.get("target_s_per_token") for r in rows):
        panels.append(("target_s_per_token", "target ms / generated token", 1000, "tab:red"))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 1.6 * len(rows) * len(panels)), 5.2))
    for ax, (key, ylabel, scale, color) in zip(axes, panels):
        ax.bar(range(len(rows)), [scale * (r.get(key) or 0) for r in rows], color=color)  # None (no tests): 0
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        if key == "pass_at_1":
            ax.set_ylim(0, 100)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _problems_per(records: list[dict], key) -> dict:
    """How many distinct problems fall under each ``key(record)`` (None: record left out); most first,
    ties in the order first stored."""
    problems: dict = {}
    for r in records:
        if (k := key(r)) is not None:
            problems.setdefault(k, set()).add((r["dataset"], r["task_id"]))
    return dict(sorted(((k, len(p)) for k, p in problems.items()), key=lambda item: -item[1]))


def problems_by_cpu(records: list[dict]) -> dict[str, int]:
    """How many problems were measured on each CPU (a resumed run can span machines); most first.

    Records from before the CPU was stored count as ``"not recorded"``."""
    return _problems_per(records, lambda r: r.get("cpu") or "not recorded")


def target_cost_curves(records: list[dict]) -> list[dict]:
    """The target cost curves the draft lengths were chosen from, each with its number of problems.

    Each record keeps the curve it ran with (a resumed run can span machines, or a re-profile);
    records of curve-using methods from before that was stored count under ``curve: None``."""

    def curve_of(r: dict) -> str | None:  # a curve as a hashable key
        return json.dumps(r.get("target_cost_curve"), sort_keys=True) if uses_cost_curve(r["method"]) else None

    return [{"curve": json.loads(k), "problems": n} for k, n in _problems_per(records, curve_of).items()]


def _curve_line(used: dict) -> str:
    curve = used["curve"]
    if curve is None:
        return f"not recorded ({used['problems']})"
    return f"profiled {curve.get('date')} on {curve.get('cpu') or 'an unrecorded CPU'} ({used['problems']})"


def write_report(
    rows: list[dict],
    out_dir: Path,
    command: str,
    config: dict,
    name: str = "summary",
    noise: dict | None = None,
    records: list[dict] | None = None,
) -> dict:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` into out_dir; return the JSON document.

    ``machine`` is where the report was written; with ``records``, ``problems_by_cpu``
    says where the problems were measured and ``target_cost_curves`` which cost curves
    the drafting methods ran with (both from the records, so a later ``--report-only`` is right)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**machine.provenance(command), "config": config, "rows": rows}
    if records:
        doc["problems_by_cpu"] = problems_by_cpu(records)
        if curves := target_cost_curves(records):
            doc["target_cost_curves"] = curves
    if noise:
        doc["logit_noise"] = noise
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    host = doc["machine"]
    md = (
        f"# Benchmark: {name}\n\nCommand: `{command}`\n\n"
        f"Machine: {host['cores']} cores, {host['cpu_model']}; {doc['date']}\n\n"
    )
    if records:
        md += "Problems measured on: " + ", ".join(f"{cpu} ({n})" for cpu, n in doc["problems_by_cpu"].items()) + "\n\n"
    if doc.get("target_cost_curves"):
        md += "Draft lengths chosen from the target cost curve " + ", ".join(
            map(_curve_line, doc["target_cost_curves"])
        )
        md += "\n\n"
    if noise:
        md += (
            f"Near-tie tolerance {noise['tolerance']:.4g} (twice the largest top-10 logit change between "
            f"one-at-a-time and {noise['chunk']}-token batched evaluation, over {noise['positions']} positions).\n\n"
        )
    (out_dir / f"{name}.md").write_text(md + markdown_table(rows))
    plot(rows, out_dir / f"{name}.png", name)
    return doc
