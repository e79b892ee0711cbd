"""Several sequences on a transformers model: sequences of equal length evaluated as one batch.

Each sequence keeps its own keys and values per layer (``[1, heads, length, head_dim]``
tensors; a copy shares the source's tensors, which are never written in place). One
``eval`` groups the sequences by (cached length, new tokens) and runs each group as
one forward pass over a batched ``DynamicCache`` built from their tensors, so no
padding or mask is needed: the cascade's k samples of one prompt stay one group for
their whole generation. Sequences at different lengths (a server's requests that
started at different steps) run as separate groups: correct, batched only within a
group.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from codeaccel.engines.sequences import SequenceSet

KV = list[tuple[object, object]]  # per layer: (keys, values), each torch.Tensor [1, heads, length, head_dim]


class HFSequences(SequenceSet):
    kind = "hf"

    def __init__(self, engine, *, n_seq_max: int, n_ctx: int):
        """``engine``: the :class:`~codeaccel.engines.hf.HFEngine` whose model this evaluates."""
        super().__init__(engine, n_ctx=n_ctx, n_seq_max=n_seq_max)
        import torch
        import transformers

        self._torch = torch
        self._cache_cls = transformers.DynamicCache
        self._kv: dict[int, KV | None] = {}  # sequence -> its cache (None: empty)

    def _open(self, seq: int, copy_of: int | None) -> None:
        self._kv[seq] = None if copy_of is None else self._kv[copy_of]

    def _close(self, seq: int) -> None:
        del self._kv[seq]

    def _truncate(self, seq: int, n_tokens: int) -> None:
        kv = self._kv[seq]
        if n_tokens == 0 or kv is None:
            self._kv[seq] = None
        else:
            self._kv[seq] = [(k[..., :n_tokens, :], v[..., :n_tokens, :]) for k, v in kv]

    def _forward(self, batch: dict[int, list[int]], wanted: dict[int, int]) -> dict[int, np.ndarray]:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for seq, tokens in batch.items():
            groups[(len(self._seqs[seq]), len(tokens))].append(seq)
        out: dict[int, np.ndarray] = {}
        for (n_past, n_new), seqs in groups.items():
            keep = max(1, *(wanted[s] for s in seqs))  # rows computed for the group: the most any member wants
            logits = self._forward_group(seqs, [batch[s] for s in seqs], n_past, 0 if keep == n_new else keep)
            out.update({s: logits[s][logits[s].shape[0] - wanted[s] :] for s in seqs})
        return out

    def _forward_group(self, seqs: list[int], tokens: list[list[int]], n_past: int, keep: int) -> dict:
        torch = self._torch
        model = self.engine.model
        if n_past:
            layers = zip(*(self._kv[s] for s in seqs))  # per layer: one (k, v) per sequence
            cache = self._cache_cls(
                ddp_cache_data=[(torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])) for kv in layers],
                config=model.config,
            )
        else:
            cache = self._cache_cls(config=model.config)
        with torch.inference_mode():
            result = model(
                input_ids=torch.tensor(tokens, dtype=torch.long),  # [group, n]
                cache=cache,
                use_cache=True,
                logits_to_keep=keep,  # 0: every row
            )
        logits = result.logits.float().numpy()  # [group, n or 1, vocab]
        for i, seq in enumerate(seqs):
            self._kv[seq] = [(layer.keys[i : i + 1], layer.values[i : i + 1]) for layer in cache.layers]
        return {seq: logits[i] for i, seq in enumerate(seqs)}
