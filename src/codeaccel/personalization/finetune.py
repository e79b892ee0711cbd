"""LoRA fine-tuning of the draft on accepted completions (peft on the transformers engine).

Each example is a prompt and the completion the draft should learn to propose: the text the
user accepted, or the target's own greedy continuation of the prompt (what a draft must imitate
to be accepted), optionally with the target's distribution at each position (distillation,
:mod:`codeaccel.personalization.distill`; the benchmark measures which teaches acceptance
better). The loss is on the completion's tokens only (cross-entropy against the token, or
against the target's distribution where the example carries it), and only they are trained
through (the prompt is read without gradients, see :func:`_loss`). Bounded: ``max_tokens`` per
example (the prompt cut from the left), batch 1, and a wall-clock budget (``max_seconds``) and
step limit, whichever comes first; peak memory (RSS) is measured and reported. The adapter is
written twice: peft's directory (for the hf engine) and a GGUF LoRA (for llama.cpp,
:mod:`codeaccel.personalization.lora_gguf`).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from codeaccel.errors import InternalError, UserError
from codeaccel.personalization.distill import TeacherTop
from codeaccel.personalization.lora_gguf import MODULE_TENSORS, from_peft_state, write_gguf_lora

log = logging.getLogger(__name__)

TARGET_MODULES = tuple(m.split(".")[-1] for m in MODULE_TENSORS)  # q_proj ... down_proj (Qwen2's names)


@dataclass(frozen=True)
class TrainingExample:
    prompt_tokens: tuple[int, ...]
    completion_tokens: tuple[int, ...]
    teacher: TeacherTop | None = None  # the target's distribution at each completion position (distillation)

    def __post_init__(self) -> None:
        if self.teacher is not None and len(self.teacher) != len(self.completion_tokens):
            raise InternalError(f"a teacher distribution for {len(self.teacher)} positions, "
                                f"a completion of {len(self.completion_tokens)} tokens")  # fmt: skip


@dataclass(frozen=True)
class TuneConfig:
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 2e-4
    epochs: int = 2
    max_steps: int | None = None
    max_seconds: float = 900.0
    max_tokens: int = 384  # per example: prompt (cut from the left) + completion
    seed: int = 0
    # permute the query/key rows of the GGUF adapter (None: as the architecture's GGUF conversion does)
    permute_qk: bool | None = None

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or self.learning_rate <= 0 or self.epochs < 1 or self.max_seconds <= 0:
            raise UserError("LoRA settings: rank >= 1, alpha > 0, learning rate > 0, epochs >= 1, max seconds > 0")
        if self.max_tokens < 8:
            raise UserError(f"max tokens per example must be >= 8, got {self.max_tokens}")


@dataclass
class TuneReport:
    examples: int
    steps: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # of the whole process (the model included)
    stopped_by: Literal["epochs", "max_steps", "max_seconds"] = "epochs"
    losses: list[float] = field(default_factory=list)  # per step: mean loss over the completion's tokens
    adapter_dir: Path | None = None
    gguf_path: Path | None = None

    def to_record(self) -> dict:
        first, last = self.losses[: max(1, len(self.losses) // 10)], self.losses[-max(1, len(self.losses) // 10) :]
        return {"examples": self.examples, "steps": self.steps, "seconds": round(self.seconds, 1),
                "peak_rss_mb": round(self.peak_rss_mb), "stopped_by": self.stopped_by,
                "loss_first": round(float(np.mean(first)), 4) if self.losses else None,
                "loss_last": round(float(np.mean(last)), 4) if self.losses else None}  # fmt: skip


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def bound_memory(max_mb: int) -> None:
    """Bound this process's data segment (heap and private writable mappings: what training allocates; a
    model file llama.cpp maps read-only does not count) to ``max_mb``: past it, allocations fail
    (MemoryError) instead of the machine swapping or the kernel killing a neighbour."""
    if max_mb < 1:
        raise UserError(f"a memory bound must be at least 1 MB, got {max_mb}")
    limit = max_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def finetune(model, examples: Sequence[TrainingExample], config: TuneConfig, out_dir: Path,
             progress: Callable[[int, int, float], None] | None = None) -> TuneReport:  # fmt: skip
    """Train a LoRA adapter on ``model`` (a transformers causal LM, left unchanged) and write it to ``out_dir``.

    progress(step, total steps, loss) after every step."""
    import peft
    import torch

    examples = [e for e in examples if e.prompt_tokens and e.completion_tokens]
    if not examples:
        raise UserError("no examples to fine-tune on (each needs a prompt and a completion)")
    torch.manual_seed(config.seed)
    lora_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                                  target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")  # fmt: skip
    tuned = peft.get_peft_model(model, lora_config)
    report = TuneReport(examples=len(examples))
    rng = np.random.default_rng(config.seed)
    order = [int(i) for _ in range(config.epochs) for i in rng.permutation(len(examples))]
    if config.max_steps is not None and config.max_steps < len(order):
        order, report.stopped_by = order[: config.max_steps], "max_steps"
    try:
        tuned.train()
        optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=config.learning_rate)
        start = time.perf_counter()
        for i in order:
            if time.perf_counter() - start > config.max_seconds:
                report.stopped_by = "max_seconds"
                break
            loss = _loss(tuned, examples[i], config.max_tokens, torch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps += 1
            report.losses.append(float(loss.detach()))
            if progress is not None:
                progress(report.steps, len(order), report.losses[-1])
        report.seconds = time.perf_counter() - start
        tuned.eval()
        out_dir = Path(out_dir)
        report.adapter_dir = out_dir / "adapter"
        tuned.save_pretrained(report.adapter_dir)
        state = {k: v.detach().float().numpy() for k, v in peft.get_peft_model_state_dict(tuned).items()}
        cfg = model.config
        report.gguf_path = write_gguf_lora(
            from_peft_state(state, config.alpha), out_dir / "adapter.gguf", cfg.model_type,
            cfg.num_attention_heads, cfg.num_key_value_heads, config.permute_qk,
        )  # fmt: skip
        report.peak_rss_mb = _peak_rss_mb()
    finally:
        tuned.unload()  # the LoRA layers out again: ``model`` is the base model once more
    return report


def _loss(model, example: TrainingExample, max_tokens: int, torch):
    """Mean loss over the completion's tokens given the prompt: cross-entropy against each token,
    or against the target's distribution where the example carries it (:func:`soft_cross_entropy`).

    The prompt is read without gradients (its keys and values are computed with the adapter, as
    the draft will read prompts, but not trained through) and only the completion's positions are
    evaluated with gradients and through the output layer: on a 384-token prompt and a 48-token
    completion that is about a third of the work of training through every position."""
    completion = list(example.completion_tokens)[: max_tokens - 1]
    prompt = list(example.prompt_tokens)[-(max_tokens - len(completion)) :]
    cache = None
    if len(prompt) > 1:
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True).cache
    logits = model(input_ids=torch.tensor([prompt[-1:] + completion[:-1]]), cache=cache,
                   use_cache=cache is not None).logits[0]  # [len(completion), vocab]  # fmt: skip
    if example.teacher is not None:
        n = len(completion)
        return soft_cross_entropy(logits, torch.from_numpy(example.teacher.ids[:n]),
                                  torch.from_numpy(example.teacher.probs[:n]), torch)  # fmt: skip
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(completion))


def soft_cross_entropy(logits, teacher_ids, teacher_probs, torch):
    """Cross-entropy of the draft against the target's top-k distribution, renormalised to 1.

    logits # [n, vocab], teacher_ids # [n, k], teacher_probs # [n, k] → a scalar: the mean over
    positions of -sum_j p_j log q(id_j), the forward KL(p || q) on the teacher's top k plus p's
    entropy (constant). Where the teacher is certain it is the ordinary cross-entropy."""
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(-1, teacher_ids)  # [n, k]
    p = teacher_probs / teacher_probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * log_q).sum(dim=-1).mean()
