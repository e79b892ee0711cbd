"""Tune, validate, then promote: one turn of the personalization loop.

Once at least ``threshold`` accepted completions are newer than the last tuning's, a copy of the
draft is fine-tuned with LoRA on the training part of the newest ``max_items`` accepted completions (one
(repository, prompt) in ``held_out_every`` is held out, by a hash of both: the same prompt accepted
twice is never on both sides), on the text the user accepted, on the target's
own greedy continuation of each prompt, or on that continuation with the target's distribution
at each position (``teach``, :mod:`codeaccel.personalization.distill`). The candidate is validated against the live
draft (the last promoted version, or the base model) on the held-out completions: mean accepted
length of greedy speculative decoding with k-token drafts against the target's continuations,
both drafts on llama.cpp, the engine that serves them. It is promoted only if it is strictly
better (:func:`should_promote`) and the live draft is still the one it was compared with;
either way the version and its measurements are kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import Engine, load_engine
from codeaccel.errors import UserError
from codeaccel.personalization.acceptance import AcceptanceStats, Continuation, measure_acceptance
from codeaccel.personalization.distill import TEACHER_TOP_K, Teach, check_teach, teacher_top_k
from codeaccel.personalization.finetune import TrainingExample, TuneConfig, TuneReport, finetune
from codeaccel.personalization.store import AcceptedStore, StoredAccepted
from codeaccel.personalization.versions import DraftVersion, DraftVersions, LiveChanged

log = logging.getLogger(__name__)


def should_promote(candidate: AcceptanceStats, live: AcceptanceStats) -> bool:
    """Promote only a draft measured on something and strictly better than the live one."""
    return candidate.verifications > 0 and candidate.mean_accepted_len > live.mean_accepted_len


@dataclass(frozen=True)
class LoopConfig:
    threshold: int = 50  # new accepted completions that start a tuning
    held_out_every: int = 5  # one (repository, prompt) in this many validates, never trains
    teach: Teach = "target"
    continuation_tokens: int = 64  # the target's continuation of each prompt (teach and validation)
    k: int = 4  # draft tokens per verification in the acceptance measurement
    tune: TuneConfig = field(default_factory=TuneConfig)
    # the newest accepted completions a tuning reads (each costs a target continuation): a store that grows for
    # months does not make every tuning longer than the last
    max_items: int = 1024

    def __post_init__(self) -> None:
        if (self.threshold < 1 or self.held_out_every < 2 or self.continuation_tokens < 1 or self.k < 1
                or self.max_items < self.held_out_every):  # fmt: skip
            raise UserError("loop settings: threshold >= 1, held out every >= 2, continuation tokens >= 1, k >= 1, "
                            "max items >= held out every")  # fmt: skip
        check_teach(self.teach)


@dataclass
class LoopResult:
    version: DraftVersion
    promoted: bool
    live_name: str | None  # the draft it was validated against (None: the base model)
    live: AcceptanceStats
    candidate: AcceptanceStats
    tune: TuneReport
    n_train: int
    n_held_out: int


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def target_continuations(target: Engine, prompts: Sequence[list[int]], n_tokens: int, progress: Progress | None = None,
                         teacher_k: int = 0) -> list[TrainingExample]:  # fmt: skip
    """The target's greedy continuation of each prompt (EOS kept: the draft must predict it too),
    as training examples; with ``teacher_k`` > 0 each carries the target's top-k distribution at
    every position (evaluated right after the continuation, the prompt still cached)."""
    out = []
    for i, prompt in enumerate(prompts):
        out.append(target_continuation(target, prompt, n_tokens, teacher_k))
        if progress is not None:
            progress("target continuations", i + 1, len(prompts))
    target.reset()
    return out


def target_continuation(target: Engine, prompt: Sequence[int], n_tokens: int, teacher_k: int = 0) -> TrainingExample:
    """One prompt's greedy continuation by the target (the prompt cut to fit its context), with its
    top-``teacher_k`` distributions where ``teacher_k`` > 0; the target's cache is left in use."""
    target.reset()
    prompt = list(prompt)[-(target.n_ctx - n_tokens - 1) :]
    tokens = tuple(generate(target, prompt, SamplingParams(), n_tokens).tokens)
    teacher = teacher_top_k(target, prompt, tokens, teacher_k) if teacher_k > 0 and tokens else None
    return TrainingExample(tuple(prompt), tokens, teacher)


def held_out(item: StoredAccepted, every: int) -> bool:
    """Whether an accepted completion validates: a hash of its repository and prompt, so every copy of a
    prompt is on the same side, in every tuning alike."""
    key = f"{item.item.repository or ''}\0{item.item.prompt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % every == 0


def split(items: Sequence[StoredAccepted], every: int) -> tuple[list[StoredAccepted], list[StoredAccepted]]:
    """(train, held out) by :func:`held_out`."""
    return [s for s in items if not held_out(s, every)], [s for s in items if held_out(s, every)]


def run_tuning(store: AcceptedStore, versions: DraftVersions, draft_model: str, target_model: str, config: LoopConfig,
               progress: Progress | None = None, force: bool = False) -> LoopResult | None:  # fmt: skip
    """One turn of the loop; None when fewer than ``threshold`` new accepted completions (unless ``force``).
    Refused while another tuning of ``versions`` runs (:meth:`DraftVersions.training`)."""
    with versions.training():
        newest = versions.last_trained_id()
        if not force and store.count(after_id=newest) < config.threshold:
            return None
        return _tune(store, versions, draft_model, target_model, config, progress or (lambda *_: None))


def _tune(store: AcceptedStore, versions: DraftVersions, draft_model: str, target_model: str, config: LoopConfig,
          report: Progress) -> LoopResult:  # fmt: skip
    items = sorted(store.items(), key=lambda s: s.id)[-config.max_items :]  # the newest
    train_items, held_items = split(items, config.held_out_every)
    if not train_items or not held_items:
        raise UserError(f"{len(items)} accepted completions: too few to hold some out (one in {config.held_out_every})")
    target = load_engine(target_model)
    try:
        held_prompts = [target.tokenize(s.item.prompt) for s in held_items]
        train_prompts = [target.tokenize(s.item.prompt) for s in train_items]
        held = [Continuation(e.prompt_tokens, e.completion_tokens)
                for e in target_continuations(target, held_prompts, config.continuation_tokens, report)
                if e.completion_tokens]  # fmt: skip
        if config.teach == "accepted":
            examples = [TrainingExample(tuple(p), tuple(target.tokenize(s.item.completion, special=False)))
                        for p, s in zip(train_prompts, train_items)]  # fmt: skip
        else:
            examples = target_continuations(target, train_prompts, config.continuation_tokens, report,
                                            teacher_k=TEACHER_TOP_K if config.teach == "distill" else 0)  # fmt: skip
    finally:
        target.close()
    version = versions.create()
    try:
        tuned, live_version, live, candidate = _train_and_validate(version, versions, draft_model, examples, held,
                                                                   config, report)  # fmt: skip
    except BaseException as exc:  # a failure (or Ctrl-C) leaves a record that says so, not a version "training"
        versions.fail(version.name, f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    promoted = should_promote(candidate, live)
    versions.record(version.name, status="validated", last_accepted_id=max(s.id for s in items),
                    n_train=len(examples), n_held_out=len(held), teach=config.teach, tune=tuned.to_record(),
                    live=live_version.name if live_version else None, live_acceptance=live.to_record(),
                    acceptance=candidate.to_record(), draft_model=draft_model, target_model=target_model)  # fmt: skip
    if promoted:
        try:
            version = versions.promote(version.name, expected_live=live_version.name if live_version else None)
        except LiveChanged as exc:  # promoted or rolled back by hand during the tuning: kept, validated
            log.warning("%s", exc)
            promoted = False
    log.info("draft %s: mean accepted length %.3f vs live %.3f: %s", version.name, candidate.mean_accepted_len,
             live.mean_accepted_len, "promoted" if promoted else "kept, not promoted")  # fmt: skip
    return LoopResult(version, promoted, live_version.name if live_version else None, live, candidate, tuned,
                      len(examples), len(held))  # fmt: skip


def _train_and_validate(version: DraftVersion, versions: DraftVersions, draft_model: str, examples: list, held: list,
                        config: LoopConfig, report: Progress):  # fmt: skip
    """Fine-tune into ``version``'s folder, then measure the live draft and the candidate on ``held``."""
    hf_draft = load_engine(draft_model, "hf", dtype="float32")
    try:
        tuned = finetune(hf_draft.model, examples, config.tune, version.path,
                         lambda s, n, loss: report(f"fine-tuning (loss {loss:.3f})", s, n))  # fmt: skip
    finally:
        hf_draft.close()
    live_version = versions.live()
    draft = load_engine(draft_model)
    try:
        report("validating", 0, 2)
        draft.set_lora(live_version.gguf if live_version is not None else None)
        live = measure_acceptance(draft, held, config.k)
        report("validating", 1, 2)
        draft.set_lora(tuned.gguf_path)
        candidate = measure_acceptance(draft, held, config.k)
        report("validating", 2, 2)
    finally:
        draft.close()
    return tuned, live_version, live, candidate
