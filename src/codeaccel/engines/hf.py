"""The transformers engine: any causal LM that transformers loads, bf16 or fp32.

Loads a Hugging Face model directory, or a GGUF file (transformers dequantises it,
about a minute for 1.5B). The KV cache is a ``DynamicCache``; rewinding crops it.
A token tree is evaluated with a 4D attention mask (each node sees the cached
prefix and its own ancestors) and explicit position ids (n_past + depth); keeping
one path gathers its positions out of every layer's keys and values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from codeaccel.engines.base import Engine
from codeaccel.errors import SetupError, UserError

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


class HFEngine(Engine):
    kind = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_name: str | None = None,
        dtype: Literal["bfloat16", "float32"] = "bfloat16",
        n_ctx: int = 4096,
        n_threads: int | None = None,
    ):
        try:
            import torch
            import transformers
        except ImportError:
            raise SetupError("the hf engine needs torch and transformers: run `make install`") from None
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self._torch = torch
        self.dtype = dtype
        if n_threads:
            torch.set_num_threads(n_threads)
        path = Path(model_path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            where, extra = str(path.parent), {"gguf_file": path.name}
        elif path.is_dir():
            where, extra = str(path), {}
        else:
            raise UserError(f"model not found: {path} (need a .gguf file or a Hugging Face model directory)")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, **extra)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=getattr(torch, dtype), **extra
            ).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"transformers could not load {path}: {exc}") from None
        self._cache_cls = transformers.DynamicCache
        self._cache = None
        eog = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if src is not None:
                eog.update([src] if isinstance(src, int) else src)
        n_vocab = self.model.get_output_embeddings().weight.shape[0]
        max_pos = getattr(self.model.config, "max_position_embeddings", n_ctx) or n_ctx
        super().__init__(
            model_name or path.stem, n_vocab=n_vocab, n_ctx=min(n_ctx, max_pos), eog_token_ids=frozenset(eog)
        )

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.tokenizer.chat_template:
            raise UserError(f"model {self.model_name} has no chat template; use a raw prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- evaluation ---------------------------------------------------------------
    def _forward(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        torch = self._torch
        if self._cache is None:
            self._cache = self._cache_cls(config=self.model.config)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([tokens], dtype=torch.long),
                    cache=self._cache,
                    use_cache=True,
                    logits_to_keep=0 if all_logits else 1,
                )
        except BaseException:
            self._restore_cache()
            raise
        return out.logits[0].float().numpy()  # [n or 1, vocab]

    def _restore_cache(self) -> None:
        """After a forward pass that failed (memory, Ctrl-C): the cache back to the tokens the engine holds
        (the layers it reached had grown in place; the next pass would read their stale keys)."""
        n_past = len(self._tokens)
        if n_past == 0 or self._cache is None:
            self._cache = None
            return
        for layer in self._cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys[..., :n_past, :]
                layer.values = layer.values[..., :n_past, :]

    def _forward_tree(self, tokens: list[int], parents: list[int], depth: list[int]) -> np.ndarray:
        torch = self._torch
        if self._cache is None:
            self._cache = self._cache_cls(config=self.model.config)
        n_past, n = len(self._tokens), len(tokens)
        allowed = torch.zeros((n, n_past + n), dtype=torch.bool)  # [n, n_past + n]
        allowed[:, :n_past] = True
        for i in range(n):
            node = i
            while node >= 0:
                allowed[i, n_past + node] = True
                node = parents[node]
        dtype = self.model.dtype
        mask = torch.zeros((1, 1, n, n_past + n), dtype=dtype)  # additive: 0 attend, min block
        mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([tokens], dtype=torch.long),
                    position_ids=torch.tensor([[n_past + d for d in depth]], dtype=torch.long),
                    attention_mask=mask,
                    cache=self._cache,
                    use_cache=True,
                )
        except BaseException:
            self._restore_cache()
            raise
        return out.logits[0].float().numpy()  # [n, vocab]

    def _keep_path(self, tokens: list[int], parents: list[int], path: list[int]) -> None:
        torch = self._torch
        n_past = len(self._tokens)
        keep = torch.tensor(list(range(n_past)) + [n_past + i for i in path], dtype=torch.long)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)

    def _drop_tree(self, n_branches: int) -> None:
        n_past = len(self._tokens)
        if self._cache is not None:
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., :n_past, :]
                layer.values = layer.values[..., :n_past, :]

    def _truncate(self, n_tokens: int) -> None:
        if n_tokens == 0:
            self._cache = None
        else:  # transformers 5 crops by a negative count of tokens to remove
            self._cache.crop(n_tokens - len(self._tokens))

    # ---- LoRA adapters (peft): a fine-tuned draft swapped in while the base stays loaded ----
    def set_lora(self, adapter_dir: Path | None) -> None:
        """Evaluate with the peft adapter in ``adapter_dir`` (None: the base model); the cache is cleared."""
        import peft  # the personalization extra

        self.reset()
        if adapter_dir is None:
            if isinstance(self.model, peft.PeftModel):
                self.model = self.model.unload()  # the adapter layers out: the base model's own weights
            self.lora_path = None
            return
        if isinstance(self.model, peft.PeftModel):
            self.model = self.model.unload()
            self.lora_path = None  # the base model, until the new adapter is in
        try:
            self.model = peft.PeftModel.from_pretrained(self.model, str(adapter_dir)).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"peft could not load the adapter {adapter_dir}: {exc}") from None
        self.lora_path = Path(adapter_dir)

    def close(self) -> None:
        self._cache = None
