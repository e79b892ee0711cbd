"""The personalization benchmark: a simulated user of one project, before and after tuning the draft.

From a real Python project's code (a repository-level set, :mod:`codeaccel.bench.repo_dataset`:
each problem is a file's text up to a function's body, and the body), the functions of most
files are the completions the user accepted; those of every ``held_out_every``-th file (sorted
by path) are held out (``split="file"``: the draft must carry what it learnt to files it never
saw), or every ``held_out_every``-th function in the set's order (``split="function"``: a user
who goes on working in the same files, held-out functions beside trained ones).
The draft is tuned with LoRA on the accepted ones, learning either the
project's own text (``accepted``), the target's greedy continuation of each prompt
(``target``), or that continuation with the target's distribution at each position (``distill``),
and measured on the held-out ones: mean accepted length and acceptance rate of
greedy speculative decoding with k-token drafts (:mod:`codeaccel.personalization.acceptance`),
and end-to-end tokens/s of speculative decoding with that draft (k fixed), beside the target
decoding alone. Rows: ``autoregressive``, ``draft-model-untuned``, ``draft-model-tuned-<teach>``.

The target's continuations (and its distributions, where ``distill`` is run) are generated once
and kept in the work folder, as are the adapters and each finished row, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codeaccel import machine
from codeaccel.bench.repo_dataset import load_repository_problems
from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.engines import Engine, load_engine
from codeaccel.engines.cost_curve import cost_curve_for
from codeaccel.errors import UserError
from codeaccel.personalization.acceptance import Continuation, measure_acceptance, measure_acceptance_by_k
from codeaccel.personalization.distill import TEACHER_TOP_K, TeacherTop, check_teach, teacher_top_k
from codeaccel.personalization.finetune import TrainingExample, TuneConfig, finetune
from codeaccel.personalization.loop import target_continuation

Progress = Callable[[str, int, int], None]
SPLITS = ("file", "function")  # what the held-out completions are: other files, or other functions


@dataclass(frozen=True)
class PersonalizationBenchConfig:
    package: str = "click"
    n_problems: int = 120
    held_out_every: int = 3  # every 3rd file (sorted) is held out, or every 3rd function (split)
    split: str = "file"  # what is held out: whole files ("file") or functions among the trained ones ("function")
    draft_model: str = "qwen2.5-coder-0.5b-instruct"
    target_model: str = "qwen2.5-coder-1.5b-instruct"
    prompt_tokens: int = 384  # each prompt's last tokens
    continuation_tokens: int = 48  # the target's continuation (teaching and measuring)
    k: int = 4  # the draft length of the end-to-end runs and of the rows' main numbers
    other_ks: tuple[int, ...] = (1, 8, 16)  # acceptance replayed at these lengths too (acceptance_by_k)
    teach: tuple[str, ...] = ("target", "accepted")
    e2e: bool = True
    train_acceptance: bool = False  # also measure on the training examples: how well the tuning fits what it saw
    tune: TuneConfig = field(default_factory=lambda: TuneConfig(epochs=2, max_seconds=600.0, max_tokens=432))

    def __post_init__(self) -> None:
        for teach in self.teach:
            check_teach(teach)
        if self.n_problems < 8 or self.held_out_every < 2:
            raise UserError("at least 8 problems, and held_out_every >= 2")
        if self.split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")


@dataclass(frozen=True)
class Example:
    task_id: str
    file: str
    prompt: tuple[int, ...]
    accepted: tuple[int, ...]  # the project's own body
    target: tuple[int, ...]  # the target's greedy continuation


def _examples(
    config: PersonalizationBenchConfig, work: Path, progress: Progress
) -> tuple[list[Example], list[Example], dict[str, TeacherTop]]:
    """(train, held out, the target's distributions by task), generated once and cached in ``work``.

    The distributions are computed only where ``distill`` is taught, right after each
    continuation (the prompt still in the target's cache), or for a work folder's older
    continuations that lack them."""
    cache, teacher_cache = work / "examples.jsonl", work / "teachers.jsonl"
    done: dict[str, Example] = {}
    for e in _cached_records(cache):
        done[e["task_id"]] = Example(e["task_id"], e["file"], tuple(e["prompt"]), tuple(e["accepted"]),
                                     tuple(e["target"]))  # fmt: skip
    teachers: dict[str, TeacherTop] = {t["task_id"]: TeacherTop.from_record(t) for t in _cached_records(teacher_cache)}
    problems = load_repository_problems(config.package, config.n_problems)
    distill = "distill" in config.teach
    todo = [p for p in problems if p.task_id not in done or (distill and p.task_id not in teachers)]
    if todo:
        target = load_engine(config.target_model)
        try:
            with cache.open("a") as out, teacher_cache.open("a") as teacher_out:
                for i, p in enumerate(todo):
                    progress("target continuations", i, len(todo))
                    teacher = None
                    if p.task_id not in done:
                        prompt = target.tokenize(p.raw_prompt)[-config.prompt_tokens :]
                        made = target_continuation(target, prompt, config.continuation_tokens,
                                                   teacher_k=TEACHER_TOP_K if distill else 0)  # fmt: skip
                        accepted = tuple(target.tokenize(p.reference or "", special=False))
                        e = Example(p.task_id, p.exclude_files[0], made.prompt_tokens, accepted, made.completion_tokens)
                        out.write(json.dumps(asdict(e)) + "\n")
                        out.flush()
                        done[p.task_id] = e
                        teacher = made.teacher
                    e = done[p.task_id]
                    if distill and teacher is None and p.task_id not in teachers and e.target:  # cached without one
                        teacher = teacher_top_k(target, e.prompt, e.target)
                    if teacher is not None:
                        teachers[p.task_id] = teacher
                        teacher_out.write(json.dumps({"task_id": p.task_id, **teacher.to_record()}) + "\n")
                        teacher_out.flush()
        finally:
            target.close()
    progress("target continuations", len(todo), len(todo))
    examples = [done[p.task_id] for p in problems]
    train, held = split_examples(examples, config.split, config.held_out_every)
    if not train or not held:
        empty = "training" if not train else "held-out"
        raise UserError(f"{len(examples)} functions of {config.package} leave the {empty} "
                        f"part empty (one {config.split} in {config.held_out_every} held out): give more --problems "
                        "or another --held-out-every")  # fmt: skip
    return train, held, teachers


def _read_tune(folder: Path) -> dict | None:
    """A finished tuning's report (None where there is none, or it was cut short: tuned again)."""
    try:
        tune = json.loads((folder / "tune.json").read_text())
    except (OSError, ValueError):
        return None
    return tune if isinstance(tune, dict) else None


def _cached_records(path: Path) -> list[dict]:
    """A cache file's records (regenerated when missing): a line cut short by a kill or a full disk is cut off
    the file, so the next append starts on a line of its own, and its record is made again."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not whole: regenerated
        if isinstance(record, dict) and "task_id" in record:
            records.append(record)
    return records


def split_examples(examples: list[Example], split: str, every: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): every ``every``-th file (sorted by path), or every ``every``-th function in order."""
    if split == "function":
        held_ids = {e.task_id for e in examples[every - 1 :: every]}
    else:
        files = sorted({e.file for e in examples})
        held_files = set(files[every - 1 :: every])
        held_ids = {e.task_id for e in examples if e.file in held_files}
    return [e for e in examples if e.task_id not in held_ids], [e for e in examples if e.task_id in held_ids]


def _training_example(e: Example, teach: str, teachers: dict[str, TeacherTop]) -> TrainingExample:
    if teach == "accepted":
        return TrainingExample(e.prompt, e.accepted)
    return TrainingExample(e.prompt, e.target, teachers.get(e.task_id) if teach == "distill" else None)


def _e2e(target: Engine, draft: Engine | None, held: list[Example], config: PersonalizationBenchConfig,
         progress: Progress, label: str) -> dict:  # fmt: skip
    """Tokens/s of the target alone (draft None) or of speculative decoding with ``draft`` (k fixed)."""
    tokens = seconds = 0.0
    length = DraftLength(cost_curve_for(target), fixed_k=config.k, stop_by_confidence=False)
    for i, e in enumerate(held):
        progress(f"end to end: {label}", i, len(held))
        target.reset()
        if draft is None:
            gen = generate(target, list(e.prompt), SamplingParams(), config.continuation_tokens)
        else:
            draft.reset()
            gen = speculative_generate(target, DraftModelDrafter(draft), length, list(e.prompt), SamplingParams(),
                                       config.continuation_tokens)  # fmt: skip
        tokens += gen.n_generated
        seconds += gen.prefill_s + gen.decode_s
    progress(f"end to end: {label}", len(held), len(held))
    return {"tokens": int(tokens), "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 3)}


def run_personalization_bench(config: PersonalizationBenchConfig, work: Path, progress: Progress) -> dict:
    """Every row (resuming from ``work``); the results document."""
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(config, work)
    rows_file = work / "rows.jsonl"
    rows = _read_rows(rows_file) if rows_file.is_file() else {}
    train, held, teachers = _examples(config, work, progress)
    held_cont = [Continuation(e.prompt, e.target) for e in held if e.target]
    train_cont = [Continuation(e.prompt, e.target) for e in train if e.target]
    base = {
        "dataset": f"repo:{config.package}",
        "model": config.target_model,
        "draft_model": config.draft_model,
        "engine": "llama.cpp",
        "n_problems": len(held_cont),
        "n_train": len(train),
        "split": config.split,
        "k": config.k,
        "pass_at_1": None,
        "tokens_per_s": None,  # measured end to end only (e2e)
        "cpu": machine.cpu_model(),
    }  # fmt: skip  (no tests: acceptance and speed only)

    def keep(row: dict) -> None:
        rows[row["method"]] = row
        with rows_file.open("a") as out:
            out.write(json.dumps(row) + "\n")

    adapters = {}
    for teach in config.teach:
        name = f"draft-model-tuned-{teach}"
        folder = work / "adapters" / teach
        measured = name in rows and not rows[name].get("pending")
        if (folder / "adapter.gguf").is_file() and (measured or (folder / "tune.json").is_file()):  # tuned before
            adapters[teach] = folder / "adapter.gguf"
            tune = _read_tune(folder) if name not in rows else None
            if name in rows or tune is not None:
                if name not in rows:
                    rows[name] = {**base, "method": name, "teach": teach, "tune": tune, "pending": True}
                continue
        examples = [_training_example(e, teach, teachers) for e in train]
        hf = load_engine(config.draft_model, "hf", dtype="float32")
        try:
            report = finetune(
                hf.model,
                examples,
                config.tune,
                folder,
                lambda s, n, loss, t=teach: progress(f"tuning on {t} (loss {loss:.3f})", s, n),
            )
        finally:
            hf.close()
        adapters[teach] = report.gguf_path
        (folder / "tune.json").write_text(json.dumps(report.to_record()))  # a rerun measures it, never retrains
        rows[name] = {**base, "method": name, "teach": teach, "tune": report.to_record(), "pending": True}

    target = load_engine(config.target_model) if config.e2e else None
    try:
        draft = load_engine(config.draft_model)
    except BaseException:  # the target loaded first is freed, not left to the process's exit
        if target is not None:
            target.close()
        raise
    try:
        if config.e2e and "autoregressive" not in rows:
            keep({**base, "method": "autoregressive", **_e2e(target, None, held, config, progress, "target alone")})
        for name, adapter in [("draft-model-untuned", None)] + [(f"draft-model-tuned-{t}", adapters[t])
                                                                  for t in config.teach]:  # fmt: skip
            measured = name in rows and not rows[name].get("pending")
            held_done = measured and "acceptance_by_k" in rows[name]
            train_done = not config.train_acceptance or "train_acceptance" in rows.get(name, {})
            if held_done and train_done:
                continue
            draft.set_lora(adapter)
            row = {**base, **rows.get(name, {}), "method": name}
            if not held_done:
                progress(f"acceptance: {name}", 0, 1)
                t0 = time.perf_counter()
                by_k = measure_acceptance_by_k(draft, held_cont, sorted({config.k, *config.other_ks}))
                row.update({**by_k[config.k].to_record(),
                            "acceptance_by_k": {str(k): s.to_record() for k, s in by_k.items()},
                            "measure_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
                row.pop("pending", None)
                if config.e2e and not measured:  # a row measured before its other lengths keeps its timing
                    row.update(_e2e(target, draft, held, config, progress, name))
            if not train_done:  # the target's continuations of the training prompts, whatever was taught
                progress(f"acceptance on the training examples: {name}", 0, 1)
                row["train_acceptance"] = measure_acceptance(draft, train_cont, config.k).to_record()
            keep(row)
    finally:
        draft.close()
        if target is not None:
            target.close()
    untuned = rows.get("draft-model-untuned", {})
    for row in rows.values():
        if untuned.get("mean_accepted_len") and row.get("mean_accepted_len") is not None:
            row["accepted_len_vs_untuned"] = round(row["mean_accepted_len"] / untuned["mean_accepted_len"], 3)
        if "acceptance_by_k" in untuned and "acceptance_by_k" in row:
            row["accepted_len_vs_untuned_by_k"] = {
                k: round(s["mean_accepted_len"] / untuned["acceptance_by_k"][k]["mean_accepted_len"], 3)
                for k, s in row["acceptance_by_k"].items() if k in untuned["acceptance_by_k"]
            }  # fmt: skip
    order = ["autoregressive", "draft-model-untuned"] + [f"draft-model-tuned-{t}" for t in config.teach]
    # rows kept by an earlier version of this run get the fields every row has now
    return {"config": {**asdict(config), "tune": asdict(config.tune)},
            "rows": [{**base, **rows[m]} for m in order if m in rows]}  # fmt: skip


def _read_rows(path: Path) -> dict[str, dict]:
    """The finished rows kept in ``rows.jsonl``, by method (a later line wins); a line that is not a row is a
    :class:`UserError` naming it (nothing is dropped: the line is the user's to repair or remove)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    rows: dict[str, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, not UTF-8: a write cut short
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise UserError(f"{path}:{n} is not a row (a JSON object with a method): repair or remove that line")
        rows[row["method"]] = row
    return rows


def _check_settings(config: PersonalizationBenchConfig, work: Path) -> None:
    """A work folder serves one set of examples: refuse another's (what ``teach`` and ``e2e`` choose may vary)."""
    fixed = {k: v for k, v in asdict(config).items() if k not in ("teach", "e2e", "other_ks", "train_acceptance")}
    fixed["tune"] = asdict(config.tune)
    path = work / "settings.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"the work folder's settings {path} are unreadable or not JSON ({exc})") from None
        if not isinstance(stored, dict):
            raise UserError(f"the work folder's settings {path} are not a JSON object; use another --work")
        stored.setdefault("split", "file")  # folders from before the setting held out files
        if stored != json.loads(json.dumps(fixed)):
            raise UserError(f"{work} holds a run with other settings ({path}); use another --work")
    else:
        path.write_text(json.dumps(fixed, indent=1))


def to_markdown(doc: dict) -> str:
    k = doc["config"]["k"]
    head = (f"| method | mean accepted length (k={k}) | × untuned | acceptance rate | tokens/s (k={k}) | held-out | "
            "trained on | training | peak memory |\n" + "|---" * 9 + "|\n")  # fmt: skip
    lines = []
    for r in doc["rows"]:
        tune = r.get("tune") or {}
        training = f"{tune['steps']} steps, {tune['seconds']} s ({tune['stopped_by']})" if tune else ""
        speed = "" if r.get("tokens_per_s") is None else r["tokens_per_s"]
        lines.append(f"| {r['method']} | {r.get('mean_accepted_len', '')} | {r.get('accepted_len_vs_untuned', '')} | "
                     f"{r.get('acceptance_rate', '')} | {speed} | {r['n_problems']} | "
                     f"{r['n_train'] if tune else ''} | {training} | "
                     f"{str(tune.get('peak_rss_mb', '')) + ' MB' if tune else ''} |")  # fmt: skip
    by_k = [r for r in doc["rows"] if "acceptance_by_k" in r]
    if by_k:
        ks = list(by_k[0]["acceptance_by_k"])
        lines.append("\nMean accepted length by draft length k (× untuned):\n")
        lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |\n" + "|---" * (len(ks) + 1) + "|")
        for r in by_k:
            ratio = r.get("accepted_len_vs_untuned_by_k", {})
            cells = [f"{r['acceptance_by_k'][k]['mean_accepted_len']} ({ratio.get(k, '')}×)" for k in ks]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    fitted = [r for r in doc["rows"] if "train_acceptance" in r]
    if fitted:
        lines.append(f"\nOn the training examples (how well each draft fits what it was tuned on), k={k}:\n")
        lines.append("| method | mean accepted length | acceptance rate | examples |\n|---|---|---|---|")
        for r in fitted:
            t = r["train_acceptance"]
            lines.append(f"| {r['method']} | {t['mean_accepted_len']} | {t['acceptance_rate']} | {t['examples']} |")
    held = {"file": "files", "function": "functions"}[doc["config"].get("split", "file")]
    title = f"# Personalization: {doc['rows'][0]['dataset'] if doc['rows'] else ''}"
    return (
        f"{title} (one in {doc['config']['held_out_every']} of its {held} held out)\n\n"
        + head
        + "\n".join(lines)
        + "\n"
    )
