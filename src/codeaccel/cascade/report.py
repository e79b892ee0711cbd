"""The cascade's report: results rows (the committed results format), a Markdown table, a cost–accuracy PNG.

Rows: one per configuration on the Pareto fronts and per single-model configuration,
per split, with ``method`` = ``cascade`` (two or more stages run) or ``single-model``,
``split`` (``tune`` | ``validate``), ``pass_at_1``, ``cost_usd`` (mean per problem, at
the configured price per hour: generation and prefill), ``prompt_cost_usd`` (the prefill
part), ``cost_usd_paper`` (the same seconds at the paper's $0.44/h), ``gen_tokens`` (mean
generated tokens per problem: answers and tests), ``prompt_tokens`` (mean prompt tokens
evaluated per problem, counted apart), ``tokens_per_s`` (generated tokens per second of
generation), the configuration, and where problems stopped. The top-level ``config`` holds
what the replay was run with (scorer, price, split, whether self-test lines repeating a
shown official test were left out). The ``summary`` compares points chosen on the tuning split
(:meth:`~codeaccel.cascade.tuner.TuneResult.comparison`): their validation rows, each with its
``tune_pass_at_1`` and ``tune_cost_usd``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from codeaccel import machine
from codeaccel.cascade.cost import PAPER_USD_PER_HOUR, usd
from codeaccel.cascade.replay import Evaluation
from codeaccel.cascade.store import Spend
from codeaccel.cascade.tuner import SPLIT_SEED, TUNE_FRACTION, Chosen, TuneResult, pareto_front


def row(e: Evaluation, *, dataset: str, engine: str, split: str, usd_per_hour: float) -> dict:
    config = e.config
    models = [config.stages[i].model for i in config.running]
    gen_s = e.cost_s - e.prompt_s
    return {
        "dataset": dataset,
        "engine": engine,
        "method": "single-model" if config.single_model else "cascade",
        "model": " → ".join(models),
        "split": split,
        "scorer": e.scorer,
        "n_problems": e.n_problems,
        "pass_at_1": round(e.pass_at_1, 4),
        "cost_usd": usd(e.cost_s, usd_per_hour),
        "prompt_cost_usd": usd(e.prompt_s, usd_per_hour),
        "cost_usd_paper": usd(e.cost_s, PAPER_USD_PER_HOUR),
        "cost_s": round(e.cost_s, 4),
        "gen_tokens": round(e.gen_tokens, 1),
        "prompt_tokens": round(e.prompt_tokens, 1),
        "tokens_per_s": round(e.gen_tokens / gen_s, 3) if gen_s > 0 else None,
        "stopped_at": {config.stages[i].label(): n for i, n in sorted(e.stopped_at().items())},  # a model may repeat
        "config": config.to_record(),
    }


def write_report(
    result: TuneResult,
    out_dir: Path,
    *,
    dataset: str,
    engine: str,
    usd_per_hour: float,
    reference: Chosen,
    validity: list[dict],
    greedy: list[tuple[Evaluation, float]],
    command: str,
    stages_per_model: Sequence[int] = (),
    generation: dict | None = None,
    shown_tests: str = "exclude",
    cost_scales: dict[str, float] | None = None,
    n_seq_max: int | None = None,
    model_specs: dict[str, str] | None = None,
    spent: dict[str, Sequence[Spend]] | None = None,
    headroom: dict[str, dict[int, float]] | None = None,
    sandbox_rules: int | None = None,
) -> list[Path]:
    """``greedy``: each model's greedy answer alone over every problem, with its seconds per token (one sequence).
    ``stages_per_model``: where a model follows itself, its number of stages, model by model; the files are
    then named for it (``cascade-humaneval-cascade-stages-1-2.md``), apart from the plain family's.
    ``generation``: the sweep's test format, answer token limit and engine, for ``cascade solve``.
    ``shown_tests``: ``exclude`` where self-test lines repeating an official test the prompt showed were
    left out of the replay, ``keep`` where they counted. ``cost_scales``: per model, the factor its measured
    costs were scaled by to the speed the sweep ran at (None: the measured costs as they are).
    ``n_seq_max``: the most sequences of one problem the replay priced as decoding at once. ``model_specs``:
    each stored model name with what loads it (``cascade solve --tuned``). ``spent``: per model, what the sweep
    spent on each of its generations (its seconds per token as actually spent, batched as it ran).
    ``headroom``: per model and k, the share of problems where one of its first k sampled answers passes (what a
    perfect selector would reach), every problem replayed. ``sandbox_rules``: the rules the store's results were
    executed under (:data:`codeaccel.sandbox.execution.RULES_VERSION`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = {"dataset": dataset, "engine": engine, "usd_per_hour": usd_per_hour}
    rows = [row(e, split="tune", **kw) for e in result.tune_front]
    rows += [row(e, split="validate", **kw) for e in result.validate_front]
    front_configs = {e.config for e in result.validate_front}
    rows += [row(e, split="validate", **kw) for e in result.validate_single if e.config not in front_configs]
    comparison = result.comparison()
    within = result.best_within(reference)

    def chosen_row(c: Chosen | None) -> dict | None:
        if c is None:
            return None
        return {**row(c.validate, split="validate", **kw), "tune_pass_at_1": round(c.tune.pass_at_1, 4),
                "tune_cost_usd": usd(c.tune.cost_s, usd_per_hour)}  # fmt: skip

    saving = comparison.saving
    summary = {
        "chosen_on": "tune",
        "best_single_model": chosen_row(comparison.best_single),
        "cascade_at_best_single_accuracy": chosen_row(comparison.cascade),
        "cost_saving_at_best_single_accuracy": None if saving is None else round(saving, 4),
        "reference": chosen_row(reference),
        "best_within_reference_cost": chosen_row(within),
    }
    doc = {
        **machine.provenance(command),
        "config": {
            "dataset": dataset,
            "engine": engine,
            "scorer": result.scorer,
            "usd_per_hour": usd_per_hour,
            "split": "sha256(seed/task_id) < tune_fraction",
            "split_seed": SPLIT_SEED,
            "tune_fraction": TUNE_FRACTION,
            "n_seq_max": n_seq_max,
            "shown_tests": shown_tests,
            "costs": "measured" if cost_scales is None else "scaled to the sweep's spend",
            **({"sandbox_rules": sandbox_rules} if sandbox_rules is not None else {}),
            **(generation or {}),
        },
        "cost_scales": {m: round(f, 4) for m, f in (cost_scales or {}).items()},  # fmt: skip
        "scorer": result.scorer,
        "usd_per_hour": usd_per_hour,
        "paper_usd_per_hour": PAPER_USD_PER_HOUR,
        "n_tune": len(result.tune_ids),
        "n_validate": len(result.validate_ids),
        "n_configs": len(result.tune_all),
        "summary": summary,
        "test_validity": validity,
        "greedy_alone": [_greedy_row(e, s_per_token, usd_per_hour) for e, s_per_token in greedy],
        "spent_in_sweep": [_spent_row(m, rows) for m, rows in (spent or {}).items() if rows],
        "any_sample_passes": [
            {"model": m, **{f"k={k}": round(v, 4) for k, v in ks.items()}} for m, ks in (headroom or {}).items()
        ],  # fmt: skip
        "rows": rows,
        **({"generation": generation} if generation else {}),
        **({"models": model_specs} if model_specs else {}),
    }
    stem = f"cascade-{dataset}-{result.scorer}"
    if any(n > 1 for n in stages_per_model):
        stem += "-stages-" + "-".join(map(str, stages_per_model))
    json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(_markdown(doc, command))
    _plot(result, reference.validate, png_path, usd_per_hour, dataset)
    return [json_path, md_path, png_path]


def _greedy_row(e: Evaluation, s_per_token: float, usd_per_hour: float) -> dict:
    """A model's greedy answer alone: what a token costs, how many it writes, so what a problem costs."""
    return {
        "model": e.config.stages[e.config.running[0]].model,
        "n_problems": e.n_problems,
        "pass_at_1": round(e.pass_at_1, 4),
        "s_per_token": float(f"{s_per_token:.4g}"),  # one sequence decoding (batch cost at b = 1)
        "tokens_per_problem": round(e.gen_tokens, 1),
        "cost_s": float(f"{e.cost_s:.4g}"),  # per problem: generation + prefill
        "cost_usd": usd(e.cost_s, usd_per_hour),
    }


def _spent_row(model: str, rows: Sequence[Spend]) -> dict:
    """What the sweep itself spent on a model's generations: each one's share of the batched steps it ran in
    and of its prompt's prefill, summed (the replay prices from measured batch costs instead)."""
    tokens = sum(r.tokens for r in rows)
    seconds = sum(r.seconds for r in rows)
    batch = sum(r.batch_size * r.tokens for r in rows) / tokens if tokens else None
    return {"model": model, "generations": len(rows), "tokens": tokens, "seconds": round(seconds, 1),
            "s_per_token": float(f"{seconds / tokens:.4g}") if tokens else None,
            "mean_batch": round(batch, 2) if batch is not None else None}  # fmt: skip


def _section(title: str, header: list[str], cells: list[list[str]]) -> list[str]:
    """A Markdown section: its title, a table of ``header`` and one row per ``cells`` (none: nothing)."""
    if not cells:
        return []
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(row) + " |" for row in cells)]  # fmt: skip


def _spent_lines(rows: list[dict]) -> list[str]:
    keys = ["model", "generations", "tokens", "seconds", "s_per_token", "mean_batch"]
    return _section("What the sweep spent (every stored generation; batched as it ran)",
                    ["model", "generations", "tokens", "seconds", "s per token", "mean batch"],
                    [[str(r[k]) for k in keys] for r in rows])  # fmt: skip


def _headroom_lines(rows: list[dict]) -> list[str]:
    ks = [key for key in rows[0] if key != "model"] if rows else []
    return _section("One of the first k sampled answers passes (a perfect selector's pass@1; every problem)",
                    ["model", *ks], [[r["model"], *(f"{r[k]:.3f}" for k in ks)] for r in rows])  # fmt: skip


def _greedy_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Each model's greedy answer alone (every problem): per token and per problem", "",
             "| model | problems | pass@1 | s per token | tokens per problem | s per problem | $ per problem |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['n_problems']} | {r['pass_at_1']:.3f} | {r['s_per_token']:.3g} | "
              f"{r['tokens_per_problem']:.1f} | {r['cost_s']:.3g} | {r['cost_usd']:.3g} |" for r in rows]  # fmt: skip
    small, large = rows[0], rows[-1]
    if len(rows) > 1 and large["s_per_token"] > 0 and large["cost_s"] > 0:
        lines += ["", f"{small['model']} against {large['model']}: "
                  f"{small['s_per_token'] / large['s_per_token']:.2f}× the cost of a token, "
                  f"{small['tokens_per_problem'] / max(large['tokens_per_problem'], 1e-9):.2f}× the tokens, "
                  f"{small['cost_s'] / large['cost_s']:.2f}× the cost of a problem."]  # fmt: skip
    return lines


def _shown_tests_note(doc: dict) -> str:
    if doc.get("config", {}).get("shown_tests") == "keep":
        return (
            "Self-test lines that repeat an official test shown in the prompt (MBPP shows all it is graded by) "
            "were kept: the selection may read the grader's own tests.\n\n"
        )
    return (
        "Self-test lines that call the function with the arguments of an official test shown in the prompt "
        "(MBPP shows all three it is graded by) were left out: answers are chosen by the models' own tests, "
        "never by the grader's.\n\n"
    )


def _cost_scale_note(doc: dict) -> str:
    scales = doc.get("cost_scales") or {}
    if not scales:
        return "Costs as measured at the start of the sweep.\n\n"
    each = ", ".join(f"{m} × {f:.2f}" for m, f in scales.items())
    return (
        "Each model's measured costs scaled to the speed the sweep actually ran at (the median over its "
        "generations of the seconds spent on each over what the measured costs price it at: its tokens at its "
        f"mean batch size and its share of its prompt's prefill): {each}.\n\n"
    )


def _markdown(doc: dict, command: str) -> str:
    s = doc["summary"]
    head = (
        f"# Cascade: {doc['rows'][0]['dataset'] if doc['rows'] else ''}, scorer {doc['scorer']}\n\n"
        f"Command: `{command}`\n\nMachine: {doc['machine']['cores']} cores, {doc['machine']['cpu_model']}; "
        f"{doc['date']}\n\n{doc['n_configs']} configurations; {doc['n_tune']} problems tune, "
        f"{doc['n_validate']} validate (by a seeded hash of the task id). Cost: mean engine seconds per problem "
        f"(answers, tests and their prompts' prefill; every decode step priced at the cost measured for the "
        f"batch of the stage's sequences still running, at most {doc['config'].get('n_seq_max')} at once) at "
        f"${doc['usd_per_hour']}/h; the paper's ${doc['paper_usd_per_hour']}/h in `cost_usd_paper`.\n\n"
        + _shown_tests_note(doc)
        + _cost_scale_note(doc)
    )
    lines = ["## Chosen on the tuning split, measured on the validation split", "",
             "| point | configuration | pass@1 tune | pass@1 validate | $/problem tune | $/problem validate |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    def point(name: str, r: dict) -> str:
        return (f"| {name} | {r['config']['label']} | {r['tune_pass_at_1']:.3f} | {r['pass_at_1']:.3f} | "
                f"{r['tune_cost_usd']:.3g} | {r['cost_usd']:.3g} |")  # fmt: skip

    lines.append(point("best single model (most accurate on tune)", s["best_single_model"]))
    if s["cascade_at_best_single_accuracy"]:
        lines.append(point("cheapest cascade at least as accurate on tune", s["cascade_at_best_single_accuracy"]))
    lines.append(point("reference", s["reference"]))
    if s["best_within_reference_cost"]:
        lines.append(point("most accurate at or below the reference's cost on tune", s["best_within_reference_cost"]))
    lines.append("")
    if s["cascade_at_best_single_accuracy"]:
        c, bs = s["cascade_at_best_single_accuracy"], s["best_single_model"]
        lines.append(f"Cost saving on validation: {100 * s['cost_saving_at_best_single_accuracy']:.1f}% "
                     f"(pass@1 {c['pass_at_1']:.3f} against {bs['pass_at_1']:.3f}).")  # fmt: skip
    else:
        lines.append("No cascade point of the tuning front reaches the best single model's tuning accuracy.")
    lines += _greedy_lines(doc.get("greedy_alone", []))
    lines += _spent_lines(doc.get("spent_in_sweep", []))
    lines += _headroom_lines(doc.get("any_sample_passes", []))
    lines += ["", "## Test validity (share of extracted lines the reference solution passes)", "",
              "| model | l | tests | tests with a kept line | lines kept | valid | left out (repeat a shown test) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {v['model']} | {v['l']} | {v['tests']} | {v['tests_with_lines']} | {v['lines']} | "
              f"{v['validity']} | {v.get('left_out', 0)} |" for v in doc["test_validity"]]  # fmt: skip
    lines += ["", "## Points", "",
              "| split | method | configuration | pass@1 | cost $/problem | prompt $ | gen tokens | stopped at |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        lines.append(f"| {r['split']} | {r['method']} | {r['config']['label']} | {r['pass_at_1']:.3f} | "
                     f"{r['cost_usd']:.3g} | {r['prompt_cost_usd']:.2g} | {r['gen_tokens']:.0f} | "
                     f"{', '.join(f'{m}: {n}' for m, n in r['stopped_at'].items())} |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def _plot(result: TuneResult, reference: Evaluation, path: Path, usd_per_hour: float, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xy(points):
        return [usd(e.cost_s, usd_per_hour) * 1e3 for e in points], [e.pass_at_1 for e in points]

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    ax.scatter(*xy(result.validate_all), s=6, color="lightgrey", label="every configuration")
    ax.plot(*xy(result.validate_front), marker="o", ms=4, label="cascade front (chosen on tune)")
    ax.plot(*xy(pareto_front(result.validate_single)), marker="s", ms=4, label="single-model front")
    ax.scatter(*xy([reference]), marker="*", s=90, color="black", zorder=5, label=reference.config.label())
    ax.set_xlabel(f"cost per problem (milli-USD at ${usd_per_hour}/h)")
    ax.set_ylabel("pass@1 (validation split)")
    ax.set_title(f"{dataset}: cascade vs single model ({result.scorer} scorer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
