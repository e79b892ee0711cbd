"""``codeaccel draft``: the draft tuned on accepted completions: train (tune, validate, promote), list,
promote, rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from codeaccel.bench.repo_dataset import package_root
from codeaccel.cli.display import err, out, save_results, stage_bars
from codeaccel.cli.feedback import StoreOpt, store_location
from codeaccel.cli.options import check_folder, check_json_file, check_model, comma_list, command_line
from codeaccel.errors import UserError
from codeaccel.personalization.bench import PersonalizationBenchConfig, run_personalization_bench, to_markdown
from codeaccel.personalization.finetune import TuneConfig, bound_memory
from codeaccel.personalization.loop import LoopConfig, run_tuning
from codeaccel.personalization.store import open_store
from codeaccel.personalization.versions import DraftVersions, default_versions_dir

app = typer.Typer(
    help="The draft tuned on accepted completions: train, list, promote, rollback, bench.", no_args_is_help=True
)

DraftOpt = Annotated[str, typer.Option("--draft-model", help="The base draft (bundled name or GGUF file).")]
VersionsOpt = Annotated[
    Optional[Path], typer.Option("--versions", help="The versions folder (default: drafts/<draft> in the cache).")
]
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def _versions(folder: Path | None, draft_model: str) -> DraftVersions:
    root = folder or default_versions_dir(draft_model)
    check_folder(root, "--versions")
    check_json_file(root / "versions.json", "the versions registry")
    return DraftVersions(root)


@app.command("train")
def draft_train(
    draft_model: DraftOpt = DEFAULT_DRAFT,
    target_model: Annotated[str, typer.Option(help="The target the draft must match.")] = "qwen2.5-coder-1.5b-instruct",
    threshold: Annotated[int, typer.Option(help="New accepted completions needed to tune.")] = 50,
    teach: Annotated[
        str, typer.Option(help="Learn the target's tokens ('target') or distributions ('distill'), or 'accepted' text.")
    ] = "target",
    epochs: Annotated[int, typer.Option(help="Passes over the training completions.")] = 2,
    max_seconds: Annotated[float, typer.Option(help="Training time budget.")] = 900.0,
    force: Annotated[bool, typer.Option(help="Tune even below the threshold.")] = False,
    max_memory_mb: Annotated[
        Optional[int], typer.Option(help="Bound this process's memory (data segment, MB); past it the tuning fails.")
    ] = None,
    store: StoreOpt = None,
    versions: VersionsOpt = None,
) -> None:
    """Tune a copy of the draft with LoRA, validate it against the live one, promote it only if better."""
    config = LoopConfig(threshold=threshold, teach=teach, tune=TuneConfig(epochs=epochs, max_seconds=max_seconds))
    check_model(draft_model)
    check_model(target_model)
    location = store_location(store, must_exist=True)
    registry = _versions(versions, draft_model)
    if max_memory_mb is not None:
        bound_memory(max_memory_mb)
    try:
        with open_store(location) as accepted, stage_bars() as progress:
            result = run_tuning(accepted, registry, draft_model, target_model, config, progress, force)
    except MemoryError:
        raise UserError(f"the tuning needed more memory than --max-memory-mb {max_memory_mb}") from None
    except (RuntimeError, ValueError) as exc:  # torch's and llama.cpp's allocators say it their own way
        if max_memory_mb is None or not _out_of_memory(exc):
            raise
        raise UserError(f"the tuning needed more memory than --max-memory-mb {max_memory_mb} ({exc})") from None
    if result is None:
        out.print(f"fewer than {threshold} new accepted completions since the last tuning: nothing to do (--force)")
        return
    table = Table(title=f"{result.version.name}: {'promoted' if result.promoted else 'not promoted (not better)'}")
    for column in ("draft", "mean accepted length", "acceptance rate", "held-out completions"):
        table.add_column(column)
    table.add_row(result.live_name or "base", f"{result.live.mean_accepted_len:.3f}",
                  f"{result.live.acceptance_rate:.3f}", str(result.n_held_out))  # fmt: skip
    table.add_row(result.version.name, f"{result.candidate.mean_accepted_len:.3f}",
                  f"{result.candidate.acceptance_rate:.3f}", str(result.n_held_out))  # fmt: skip
    out.print(table)
    t = result.tune
    err.print(f"[dim]{result.n_train} training completions, {t.steps} steps in {t.seconds:.0f} s "
              f"({t.stopped_by}), peak memory {t.peak_rss_mb:.0f} MB[/dim]")  # fmt: skip


def _out_of_memory(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in ("not enough memory", "failed to allocate", "cannot allocate memory",
                                         "out of memory", "failed to create context"))  # fmt: skip


@app.command("list")
def draft_list(draft_model: DraftOpt = DEFAULT_DRAFT, versions: VersionsOpt = None) -> None:
    """Every tuned version, its status and its measured acceptance."""
    registry = _versions(versions, draft_model)
    live = registry.live()
    table = Table(title=f"drafts of {draft_model} in {registry.root} (live: {live.name if live else 'base'})")
    for column in ("version", "status", "trained on", "mean accepted length", "vs live then", "training"):
        table.add_column(column)
    for v in registry.list():
        r = v.record
        acceptance = (r.get("acceptance") or {}).get("mean_accepted_len")
        before = (r.get("live_acceptance") or {}).get("mean_accepted_len")
        tune = r.get("tune") or {}
        status = f"failed ({r['error']})" if r.get("status") == "failed" and r.get("error") else r.get("status", "")
        table.add_row(v.name, status, str(r.get("n_train", "")), str(acceptance or ""),
                      f"{r.get('live') or 'base'} {before}" if before is not None else "",
                      f"{tune.get('seconds', '')} s, {tune.get('peak_rss_mb', '')} MB" if tune else "")  # fmt: skip
    out.print(table)


@app.command("promote")
def draft_promote(name: Annotated[str, typer.Argument(help="The version (v1, v2, ...).")],
                  draft_model: DraftOpt = DEFAULT_DRAFT, versions: VersionsOpt = None) -> None:  # fmt: skip
    """Make a version the live draft (servers and clients watching the folder switch to it)."""
    out.print(f"live: {_versions(versions, draft_model).promote(name).name}")


@app.command("rollback")
def draft_rollback(draft_model: DraftOpt = DEFAULT_DRAFT, versions: VersionsOpt = None) -> None:
    """Back to the version live before (the base model when none)."""
    back = _versions(versions, draft_model).rollback()
    out.print(f"live: {back.name if back else 'base'}")


@app.command("bench")
def draft_bench(
    package: Annotated[str, typer.Option(help="The installed Python project the simulated user works on.")] = "click",
    problems: Annotated[int, typer.Option(help="Functions taken from it.")] = 120,
    held_out_every: Annotated[int, typer.Option(help="Every n-th file (sorted), or function, is held out.")] = 3,
    split: Annotated[
        str, typer.Option(help="Hold out whole files (file) or functions among the trained ones (function).")
    ] = "file",
    draft_model: DraftOpt = DEFAULT_DRAFT,
    target_model: Annotated[str, typer.Option(help="The target.")] = "qwen2.5-coder-1.5b-instruct",
    teach: Annotated[str, typer.Option(help="What the tuned drafts learn: target, distill, accepted (comma).")] = (
        "target,accepted"
    ),
    epochs: Annotated[int, typer.Option(help="Passes over the training completions.")] = 2,
    max_seconds: Annotated[float, typer.Option(help="Training time budget per tuning.")] = 600.0,
    e2e: Annotated[bool, typer.Option("--e2e/--no-e2e", help="Also time speculative decoding end to end.")] = True,
    train_acceptance: Annotated[
        bool, typer.Option(help="Also measure each draft on the training examples (how well tuning fits them).")
    ] = False,
    work: Annotated[Path, typer.Option(help="Continuations, adapters and finished rows (resumable).")] = Path(
        "runs/personalization"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Where the results go.")] = Path("runs/personalization"),
) -> None:
    """Tune the draft on part of a project's code, measure acceptance and speed on the rest, before and after."""
    teaching = comma_list(teach, "--teach")
    package_root(package)  # all refused before the work folder records these settings
    check_model(draft_model)
    check_model(target_model)
    check_folder(work, "--work")
    check_folder(out_dir)
    check_json_file(work / "settings.json", "the work folder's settings")
    tune = TuneConfig(epochs=epochs, max_seconds=max_seconds, max_tokens=432)
    config = PersonalizationBenchConfig(package=package, n_problems=problems, held_out_every=held_out_every,
                                        split=split, draft_model=draft_model, target_model=target_model,
                                        teach=teaching, e2e=e2e, train_acceptance=train_acceptance,
                                        tune=tune)  # fmt: skip
    with stage_bars() as progress:
        doc = run_personalization_bench(config, work, progress)
    save_results(doc, out_dir, "personalization", to_markdown, command_line())
