"""A LoRA adapter as llama.cpp reads it: a GGUF file written with the ``gguf`` package.

peft stores, per adapted linear layer ``W`` [out, in] of a Hugging Face model, ``lora_A``
[r, in] and ``lora_B`` [out, r], applied as ``W + (alpha / r) · B · A``. llama.cpp reads the same
pair from a GGUF whose ``general.type`` is ``adapter`` and ``adapter.type`` is ``lora``, with
``adapter.lora.alpha``, as tensors ``<model tensor>.lora_a`` [r, in] and ``.lora_b`` [out, r]
(numpy order) named after the base model's GGUF tensors (``blk.{i}.attn_q.weight``, ...), and
scales them by alpha / r itself. For the ``llama`` architecture, whose GGUF conversion permutes
the rows of the query and key projections for llama.cpp's rope, ``lora_B`` of those two is
permuted the same way; Qwen2's are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codeaccel.errors import UserError

# Hugging Face module (Qwen2 / Llama) -> the base model's GGUF tensor
MODULE_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PEFT_NAME = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    """One adapter: per (layer, module), A [r, in] and B [out, r] (float32), and its alpha."""

    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    alpha: float

    @property
    def rank(self) -> int:
        return next(iter(self.pairs.values()))[0].shape[0]


def from_peft_state(state: dict[str, np.ndarray], alpha: float) -> LoraWeights:
    """peft's adapter state dict (``...layers.3.self_attn.q_proj.lora_A.weight``) as LoraWeights."""
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in state.items():
        m = _PEFT_NAME.search(name)
        if m is None:
            raise UserError(f"not a LoRA weight of a Qwen2/Llama projection: {name}")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = np.asarray(value, dtype=np.float32)
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            raise UserError(f"layer {key[0]} {key[1]}: lora_A and lora_B must both be present")
        if half["A"].shape[0] != half["B"].shape[1]:
            raise UserError(f"layer {key[0]} {key[1]}: ranks differ ({half['A'].shape} vs {half['B'].shape})")
        pairs[key] = (half["A"], half["B"])
    if not pairs:
        raise UserError("the adapter holds no LoRA weights")
    return LoraWeights(pairs, alpha)


def _permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's llama permutation of a projection's output rows (rope pairs interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf_lora(lora: LoraWeights, path: Path, architecture: str, n_head: int = 0, n_head_kv: int = 0,
                    permute_qk: bool | None = None) -> Path:  # fmt: skip
    """Write ``lora`` for a base model of ``architecture`` (``qwen2``, ``llama``) as a GGUF adapter.

    permute_qk: permute the query and key rows (None: for ``llama``, as its GGUF conversion does;
    False for a llama GGUF written without that permutation)."""
    import gguf  # the llama extra

    permute_qk = architecture == "llama" if permute_qk is None else permute_qk
    if permute_qk and not (n_head and n_head_kv):
        raise UserError("a llama adapter needs the head counts (its query and key rows are permuted)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(lora.alpha))
    for (layer, module), (a, b) in sorted(lora.pairs.items()):
        if permute_qk and module in ("self_attn.q_proj", "self_attn.k_proj"):
            b = _permute_rows(b, n_head if module == "self_attn.q_proj" else n_head_kv)
        name = f"blk.{layer}.{MODULE_TENSORS[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
