"""Several sequences on a transformers model: one padded batch per evaluation.

Each sequence keeps its own keys and values per layer (``[1, heads, length, head_dim]``
tensors; a copy shares the source's tensors, which are never written in place). One
``eval`` runs the sequences as padded batches over a batched ``DynamicCache`` built
from their tensors: row i's cache is left-padded to the longest cache P in the batch,
its new tokens start at P and are right-padded to the longest step N, a 2-D attention
mask hides both pads and explicit position ids keep every token at its own position,
so each row computes what it computes alone (up to the float noise of another batch
shape). Pads are never fully masked queries (the new tokens come first in their block),
so no row's keys are NaN. After the pass each sequence keeps only its real positions.

Padding costs evaluated tokens: sequences are sorted by step length and a batch takes the
next one only while its padded tokens (rows × longest step) stay within ``CHEAP_TOKENS`` (on a
CPU a pass of a few tokens costs about one decode step, see the hf cost curves) or within
``MAX_PADDING`` times its real tokens. One-token decode steps always share a pass; a long
prompt chunk, or one long draft beside many one-token rows, runs as a pass of its own.
Sequences of equal cache and step lengths (the cascade's k samples of one prompt) need no
padding at all. (The batch's draft-length choice prices such a step by its longest draft:
``choose_draft_lengths(padded=True)``.) After a pass of several rows each sequence keeps a copy of its own
positions, so a sequence that stops (a kept cache) does not pin the batch's padded tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.engines.sequences import SequenceSet

KV = list[tuple[object, object]]  # per layer: (keys, values), each torch.Tensor [1, heads, length, head_dim]

MAX_PADDING = 2.0  # a batch evaluates at most this many times its real new tokens (pads included)...
CHEAP_TOKENS = 16  # ...or at most this many tokens in all (rows × longest step), whatever it pads


@dataclass(frozen=True)
class _Row:
    seq: int
    tokens: list[int]  # the new tokens
    n_past: int  # tokens its cache holds
    wanted: int  # logits rows asked for (the last ones)


def plan_batches(rows: list[tuple[int, int]], *, max_padding: float = MAX_PADDING, cheap_tokens: int = CHEAP_TOKENS):
    """Split rows ``(seq, n_new)`` into batches: sorted by n_new, a batch takes the next row while its
    padded tokens ``len(batch) * longest <= max(cheap_tokens, max_padding * real)``."""
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for seq, n_new in sorted(rows, key=lambda r: (r[1], r[0])):  # ascending: the new row is the longest
        padded = (len(current) + 1) * n_new
        if current and padded > max(cheap_tokens, max_padding * (real + n_new)):
            batches.append(current)
            current, real = [], 0
        current.append(seq)
        real += n_new
    if current:
        batches.append(current)
    return batches


class HFSequences(SequenceSet):
    kind = "hf"
    pads_rows = True

    def __init__(self, engine, *, n_seq_max: int, n_ctx: int):
        """``engine``: the :class:`~codeaccel.engines.hf.HFEngine` whose model this evaluates."""
        super().__init__(engine, n_ctx=n_ctx, n_seq_max=n_seq_max)
        import torch
        import transformers

        self._torch = torch
        self._cache_cls = transformers.DynamicCache
        self._kv: dict[int, KV | None] = {}  # sequence -> its cache (None: empty)
        self.n_forward = 0  # forward passes run so far (batches, not sequences)

    def evaluated_tokens(self, steps: Sequence[int]) -> int:
        """Rows × longest step, summed over the passes :func:`plan_batches` makes of them."""
        plans = plan_batches(list(enumerate(steps)))
        return sum(len(b) * max(steps[i] for i in b) for b in plans)

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
        out: dict[int, np.ndarray] = {}
        grown: dict[int, KV] = {}  # every sequence's new cache, kept only once every pass succeeded
        for seqs in plan_batches([(seq, len(tokens)) for seq, tokens in batch.items()]):
            rows = [_Row(s, batch[s], len(self._seqs[s]), wanted[s]) for s in seqs]
            logits, caches = self._forward_batch(rows)
            out.update(logits)
            grown.update(caches)
        self._kv.update(grown)  # a pass that failed left every cache as its tokens say (the eval records none)
        return out

    def _forward_batch(self, rows: list[_Row]) -> tuple[dict[int, np.ndarray], dict[int, KV]]:
        """One pass: each row's logits and its cache after it (not yet the sequence's)."""
        torch = self._torch
        model = self.engine.model
        past = max(r.n_past for r in rows)  # P: cache positions of the padded batch
        step = max(len(r.tokens) for r in rows)  # N: new positions of the padded batch
        padded = any(r.n_past != past or len(r.tokens) != step for r in rows)
        keep = max(1, max(r.wanted for r in rows))  # logits rows computed per row, ending at its last real token
        cached = {"ddp_cache_data": self._padded_cache(rows, past)} if past else {}
        cache = self._cache_cls(**cached, config=model.config)
        inputs = {"input_ids": torch.tensor([r.tokens + [0] * (step - len(r.tokens)) for r in rows], dtype=torch.long)}
        if not padded:
            inputs["logits_to_keep"] = 0 if keep == step else keep  # the last keep positions (0: all)
        else:
            # positions per row  # [batch, keep], ending at its last real token (clipped to 0 where it has fewer)
            inputs["logits_to_keep"] = torch.tensor(
                [[max(0, len(r.tokens) - keep + j) for j in range(keep)] for r in rows], dtype=torch.long
            )
            mask = torch.zeros((len(rows), past + step), dtype=torch.long)  # [batch, P + N]; 1 = attend
            for i, r in enumerate(rows):
                mask[i, past - r.n_past : past + len(r.tokens)] = 1
            inputs["attention_mask"] = mask
            inputs["position_ids"] = torch.stack([torch.arange(r.n_past, r.n_past + step) for r in rows])  # [batch, N]
        with torch.inference_mode():
            result = model(**inputs, cache=cache, use_cache=True)
        self.n_forward += 1
        logits = result.logits.float().numpy()  # [batch, keep, vocab]
        out, caches = {}, {}
        for i, r in enumerate(rows):
            out[r.seq] = logits[i, keep - r.wanted : keep]
            # copies after any pass of several rows: a view would pin the whole batch's tensors (a kept cache)
            caches[r.seq] = self._unpad(cache, i, r, past, copy=padded or len(rows) > 1)
        return out, caches

    def _padded_cache(self, rows: list[_Row], past: int) -> list:
        """Per layer (keys, values) # [batch, heads, P, head_dim], row i left-padded with zeros."""
        torch = self._torch
        some = next(self._kv[r.seq] for r in rows if r.n_past)
        layers = []
        for layer, (k0, v0) in enumerate(some):
            ks, vs = [], []
            for r in rows:
                kv = self._kv[r.seq]
                k, v = kv[layer] if kv is not None else (k0[..., :0, :], v0[..., :0, :])
                if r.n_past < past:
                    pad = (0, 0, past - r.n_past, 0)  # left-pad the length dimension
                    k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks), torch.cat(vs)))
        return layers

    def _unpad(self, cache, i: int, r: _Row, past: int, copy: bool) -> KV:
        """Row i's real positions of the cache after a pass: its cache, then its new tokens; views of the
        batch's tensors, or copies (``copy``: after a pass of several rows, not to pin its pads and other rows)."""
        start, end = past - r.n_past, past + len(r.tokens)  # left pads before, right pads after
        kv = [(layer.keys[i : i + 1, :, start:end], layer.values[i : i + 1, :, start:end]) for layer in cache.layers]
        return [(k.clone(), v.clone()) for k, v in kv] if copy else kv
