"""One suffix-array index over token ids: built once, memory-mapped, searched in microseconds.

Layout of an index directory::

    tokens.npy   uint32 [n]   the documents' token ids, each document followed by SEP
    sa.npy       int32/int64 [n]  suffix array: positions sorted by the token sequence starting there
    docs.npy     int64 [n_docs]   start position of each document
    heads.npy    int64 [max_id+2] SA rows of the suffixes starting with token t: heads[t]:heads[t+1]
    meta.json    sizes and sha256 of the three arrays, tokenizer fingerprint, build time

The suffix array comes from libdivsufsort (``pydivsufsort``), which sorts integer
alphabets directly. Every suffix starting with a pattern lies in one contiguous SA
range; :meth:`SuffixIndex.find` narrows that range one pattern token at a time by
binary search (the tokens at offset j of the suffixes in a range that share the
first j tokens are sorted). ``SEP`` (2**32 - 1, above any vocabulary) ends each
document, so no match or continuation crosses from one file into the next.

Worked example: tokens ``[5, 3, 9, 3, 9, 1]`` have suffix array ``[5, 3, 1, 0, 4, 2]``
(``[1] < [3, 9, 1] < [3, 9, 3, ...] < [5, ...] < [9, 1] < [9, 3, ...]``); the pattern
``[3, 9]`` occupies SA rows 1..2, i.e. positions 3 and 1, whose continuations are
``[1]`` and ``[3, 9, 1]``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydivsufsort import divsufsort

from codeaccel.errors import SetupError

SEP = np.uint32(0xFFFFFFFF)  # document separator; sorts after every real token
FORMAT = "codeaccel-suffix-index/v1"
_SMALL_RANGE = 256  # below this many SA rows, narrow with one vectorised searchsorted


class StaleIndexError(SetupError):
    """An index on disk is missing, corrupt, or built for something else."""


@dataclass(frozen=True)
class IndexMeta:
    n_tokens: int
    n_docs: int
    tokenizer: str  # fingerprint of the tokenizer the ids come from
    build_s: float
    sha256: dict  # file name -> digest


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_index(docs: Sequence[np.ndarray], out_dir: Path, tokenizer: str) -> IndexMeta:
    """Write an index of ``docs`` (each a token-id array) to out_dir, atomically (temp dir, then rename)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)  # +1: the separator
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.full(int(lengths.sum()), SEP, dtype=np.uint32)  # [n]
    for start, doc in zip(starts, docs):
        tokens[start : start + len(doc)] = doc
    sa = divsufsort(tokens) if len(tokens) else np.empty(0, np.int32)  # [n]
    real = tokens[tokens != SEP]
    first = tokens[sa]  # [n] sorted: the first token of each suffix
    heads = np.searchsorted(first, np.arange(int(real.max()) + 2 if len(real) else 1, dtype=np.uint32))  # [max_id+2]
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = {"tokens.npy": tokens, "sa.npy": sa, "docs.npy": starts, "heads.npy": heads.astype(np.int64)}
    for name, arr in arrays.items():
        np.save(tmp / name, arr)
    meta = IndexMeta(
        n_tokens=len(tokens),
        n_docs=len(docs),
        tokenizer=tokenizer,
        build_s=round(time.perf_counter() - t0, 3),
        sha256={name: _digest(tmp / name) for name in arrays},
    )
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta.__dict__}, indent=2))
    if out_dir.exists():
        _remove_tree(out_dir)
    os.replace(tmp, out_dir)
    return meta


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)


class SuffixIndex:
    """A read-only, memory-mapped index. ``verify=True`` checks every array's sha256 on open."""

    def __init__(self, path: Path, tokenizer: str | None = None, verify: bool = True):
        self.path = Path(path)
        try:
            raw = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise StaleIndexError(f"index {self.path} is missing or unreadable: {exc}") from None
        if raw.get("format") != FORMAT:
            raise StaleIndexError(f"index {self.path} has format {raw.get('format')!r}, expected {FORMAT}")
        raw.pop("format")
        self.meta = IndexMeta(**raw)
        if tokenizer is not None and self.meta.tokenizer != tokenizer:
            raise StaleIndexError(f"index {self.path} was built for another tokenizer")
        for name, digest in self.meta.sha256.items():
            file = self.path / name
            if not file.is_file() or (verify and _digest(file) != digest):
                raise StaleIndexError(f"index {self.path}: {name} is missing or corrupt")
        try:
            # memory-mapped, but as plain ndarray views: np.memmap's own __getitem__ costs ~0.7 µs
            # per element read, which dominated lookups (the views keep the mapping alive)
            self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r").view(np.ndarray)  # uint32 [n]
            self.sa = np.load(self.path / "sa.npy", mmap_mode="r").view(np.ndarray)  # int [n]
            self.doc_starts = np.load(self.path / "docs.npy", mmap_mode="r").view(np.ndarray)  # int64 [n_docs]
            self.heads = np.load(self.path / "heads.npy")  # int64 [max_id+2]
        except (OSError, ValueError) as exc:
            raise StaleIndexError(f"index {self.path} cannot be read: {exc}") from None
        if len(self.tokens) != self.meta.n_tokens or len(self.sa) != len(self.tokens):
            raise StaleIndexError(f"index {self.path}: array sizes do not match its metadata")

    def __len__(self) -> int:
        return len(self.tokens)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def _column(self, lo: int, hi: int, offset: int) -> np.ndarray:
        """Token ``offset`` of the suffixes in SA rows [lo, hi), -1 past the end of the array."""  # int64 [hi-lo]
        pos = self.sa[lo:hi].astype(np.int64) + offset
        col = self.tokens[np.minimum(pos, len(self.tokens) - 1)].astype(np.int64)
        col[pos >= len(self.tokens)] = -1  # past the end sorts first
        return col

    def find(self, pattern: Sequence[int]) -> tuple[int, int]:
        """The SA rows [lo, hi) of suffixes that start with ``pattern`` (lo == hi: no occurrence).

        Narrows one pattern token at a time: a small range is read as one column and
        searched with ``np.searchsorted``; a large one by bisection, reading one row per probe.
        """
        if not len(pattern):
            return 0, len(self.sa)
        first = int(pattern[0])
        if not 0 <= first < len(self.heads) - 1:
            return 0, 0
        lo, hi = int(self.heads[first]), int(self.heads[first + 1])
        sa, tokens, n = self.sa, self.tokens, len(self.tokens)
        for j, t in enumerate(pattern[1:], start=1):
            t = int(t)
            if lo >= hi:
                break
            if hi - lo <= _SMALL_RANGE:
                col = self._column(lo, hi, j)
                lo, hi = lo + int(np.searchsorted(col, t, "left")), lo + int(np.searchsorted(col, t, "right"))
            else:

                def key(row: int, j: int = j) -> int:
                    pos = int(sa[row]) + j
                    return int(tokens[pos]) if pos < n else -1

                new_lo = bisect.bisect_left(range(len(sa)), t, lo, hi, key=key)
                hi = bisect.bisect_right(range(len(sa)), t, new_lo, hi, key=key)
                lo = new_lo
        return (lo, hi) if lo < hi else (lo, lo)

    def continuations(
        self,
        lo: int,
        hi: int,
        offset: int,
        length: int,
        max_samples: int = 64,
        exclude_docs: frozenset[int] = frozenset(),
    ) -> Counter:
        """Count the up-to-``length``-token continuations after ``offset`` tokens of SA rows [lo, hi).

        A large range is sampled evenly (the rows are sorted by continuation, so an even
        stride keeps the frequencies); continuations stop at a document's end.
        """
        if hi <= lo or length <= 0:
            return Counter()
        rows = np.arange(lo, hi) if hi - lo <= max_samples else np.linspace(lo, hi - 1, max_samples).astype(np.int64)
        starts = self.sa[rows].astype(np.int64)  # [rows]
        if exclude_docs:
            starts = starts[~np.isin(self.docs_of(starts), np.fromiter(exclude_docs, np.int64))]
        pos = starts[:, None] + offset + np.arange(length)  # [rows, length]
        window = self.tokens[np.minimum(pos, len(self.tokens) - 1)]  # [rows, length]
        window = np.where(pos < len(self.tokens), window, SEP)
        at_sep = window == SEP  # [rows, length]
        ends = np.where(at_sep.any(axis=1), at_sep.argmax(axis=1), length)  # [rows]
        counts: Counter = Counter()
        for row, end in zip(window.tolist(), ends.tolist()):
            if end:
                counts[tuple(row[:end])] += 1
        return counts

    def docs_of(self, positions: np.ndarray) -> np.ndarray:
        """The document holding each token position."""  # int64 [n] -> int64 [n]
        return np.searchsorted(self.doc_starts, positions, side="right") - 1
