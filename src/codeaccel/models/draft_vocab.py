"""A cheaper draft model, still lossless: its output layer cut to the most frequent tokens (FR-Spec).

The bundled 0.5B draft spends 30% of its weight bytes in its 151,936-row output
layer (``output.weight``, Q8_0, 145 MB of 485 MB), and reads all of it for every
token it drafts. FR-Spec (Zhao et al., 2025, "FR-Spec: Accelerating Large-Vocabulary
Language Models via Frequency-Ranked Speculative Sampling") keeps only the rows of
the tokens most frequent in a corpus. The draft's distribution becomes its own
renormalised over that subset, with probability 0 for every other token; the target
verifies as before, so the output stays exactly the target's (greedy: its argmax;
sampling: rejection sampling with q = 0 outside the subset is still exact, the
residual max(p - q, 0) carries the rest). Only acceptance can drop, when the target
wants a token the draft cannot name.

The reduced model is a GGUF file written once into the cache (:func:`draft_vocabulary`):
every tensor copied byte for byte except ``token_embd`` and ``output``, of which only
the kept tokens' rows remain (a quantized row is its own byte range, so nothing is
requantized), and the tokenizer replaced by ``tokenizer.ggml.model = "none"`` with
``<arch>.vocab_size = N`` (llama.cpp then makes N placeholder tokens). The engine
feeds it input *embeddings* read from the original file's ``token_embd``
(:class:`TokenEmbeddings`), so every input token, kept or not, is the model's own,
and scatters its N logits back to the full vocabulary (:class:`DraftVocabulary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codeaccel.errors import SetupError, UserError
from codeaccel.models.registry import cache_dir

log = logging.getLogger(__name__)

FORMAT = "codeaccel-draft-vocab/v1"
EMBEDDING_TENSOR = "token_embd.weight"
MIN_SIZE = 256  # fewer rows than this is not a language model any more


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SetupError("a reduced draft vocabulary needs the gguf package: run `make install`") from None
    return gguf


@dataclass(frozen=True, eq=False)  # an array field: compared by identity, not elementwise
class DraftVocabulary:
    """The reduced model file and the full-vocabulary ids of its rows, in row order."""

    path: Path  # the reduced GGUF
    token_ids: np.ndarray  # int64 [N], ascending: row r of the reduced output layer is token token_ids[r]
    corpus: str  # where the ranking came from (recorded next to the file)

    @property
    def size(self) -> int:
        return len(self.token_ids)

    @property
    def fingerprint(self) -> str:
        """The kept token ids, hashed (12 hex digits): two vocabularies of one size that keep other tokens differ."""
        return hashlib.sha256(np.asarray(self.token_ids, dtype="<i8").tobytes()).hexdigest()[:12]

    def scatter(self, logits: np.ndarray, n_vocab: int) -> np.ndarray:
        """Reduced logits  # [n, N] -> full-vocabulary logits  # [n, n_vocab], -inf (probability 0) elsewhere."""
        out = np.full((logits.shape[0], n_vocab), -np.inf, dtype=np.float32)
        out[:, self.token_ids] = logits
        return out


def rank_vocabulary(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The ``size`` token ids to keep: ``always`` (e.g. the end-of-generation tokens), then the most counted.

    ``counts``  # [n_vocab] occurrences per token id. Ties go to the smaller id, so a
    ranking is a pure function of its counts. Returns int64 ids, ascending.
    """
    n_vocab = len(counts)
    if not MIN_SIZE <= size <= n_vocab:
        raise UserError(f"a draft vocabulary needs {MIN_SIZE} to {n_vocab} tokens, got {size}")
    forced = sorted({int(t) for t in always if 0 <= int(t) < n_vocab})
    if len(forced) > size:
        raise UserError(f"a draft vocabulary of {size} tokens cannot hold the {len(forced)} tokens it must keep")
    order = np.lexsort((np.arange(n_vocab), -np.asarray(counts, dtype=np.int64)))  # most counted first, then by id
    chosen = set(forced)
    for t in order:
        if len(chosen) == size:
            break
        chosen.add(int(t))
    return np.array(sorted(chosen), dtype=np.int64)


COUNT_CHUNK = 1 << 23  # tokens counted at a time: a datastore's memory-mapped array is never copied whole


def token_counts(token_arrays: Iterable[np.ndarray], n_vocab: int) -> np.ndarray:
    """Occurrences per token id  # [n_vocab] int64 over some token arrays (ids >= n_vocab, e.g. separators, ignored)."""
    counts = np.zeros(n_vocab, dtype=np.int64)
    for tokens in token_arrays:
        for start in range(0, len(tokens), COUNT_CHUNK):
            chunk = np.asarray(tokens[start : start + COUNT_CHUNK])
            counts += np.bincount(chunk[chunk < n_vocab], minlength=n_vocab)[:n_vocab]
    return counts


def write_reduced_model(source: Path, token_ids: np.ndarray, out: Path) -> None:
    """Write ``source`` with only ``token_ids``' rows in its embedding and output layers (see the module doc)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    tensors = {t.name: t for t in reader.tensors}
    if EMBEDDING_TENSOR not in tensors:
        raise UserError(f"{source} has no {EMBEDDING_TENSOR}: cannot reduce its vocabulary")
    if "split.count" in reader.fields:
        raise UserError(f"{source} is one part of a split GGUF: merge it into one file first")
    n_vocab = int(tensors[EMBEDDING_TENSOR].shape[-1])
    if token_ids.max(initial=-1) >= n_vocab:
        raise UserError(f"token id {int(token_ids.max())} is outside {source.name}'s vocabulary of {n_vocab}")
    # per vocabulary entry: the embedding and output rows (and an output bias, where a model has one)
    per_token = {EMBEDDING_TENSOR, *(n for n in tensors if n.startswith("output.") and n != "output_norm.weight")}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    written = False
    try:
        if "general.alignment" in reader.fields:  # tensor offsets follow the writer's alignment, not a copied key
            writer.data_alignment = int(reader.fields["general.alignment"].contents())
        for key, field in reader.fields.items():
            skip = ("general.architecture", "general.alignment", f"{arch}.vocab_size")
            if key.startswith(("GGUF.", "tokenizer.")) or key in skip:
                continue
            kind = field.types[0]
            sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub)
        writer.add_key_value("tokenizer.ggml.model", "none", gguf.GGUFValueType.STRING)
        writer.add_key_value(f"{arch}.vocab_size", len(token_ids), gguf.GGUFValueType.UINT32)
        for tensor in reader.tensors:
            data = tensor.data  # [rows, bytes per row] for quantized types, [rows, n_embd] otherwise
            if tensor.name in per_token:
                data = np.ascontiguousarray(data[token_ids])
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
        if writer.data_alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.add_custom_alignment(writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:  # on disk before it gets its final name: a crash leaves no short file behind
            os.fsync(f.fileno())
        os.replace(tmp, out)
        written = True
    finally:
        writer.close()
        if not written:
            tmp.unlink(missing_ok=True)


def draft_vocabulary(
    source: Path, counts: np.ndarray, size: int, always: Sequence[int], corpus: str
) -> DraftVocabulary:
    """The reduced model of ``source`` keeping ``size`` tokens ranked by ``counts``: written once, then reused.

    The file is named by a hash of the source file's identity and the kept ids, so
    another ranking or another source never reuses a stale file.
    """
    source = Path(source)
    token_ids = rank_vocabulary(counts, size, always)
    stat = source.stat()
    key = hashlib.sha256(
        json.dumps([FORMAT, source.name, stat.st_size, int(stat.st_mtime)]).encode() + token_ids.tobytes()
    ).hexdigest()[:12]
    folder = cache_dir() / "draft_vocab"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source.stem}-vocab{size}-{key}.gguf"
    record = path.with_suffix(".json")
    if not (path.is_file() and record.is_file()):
        log.info("writing a %d-token draft vocabulary of %s (once): %s", size, source.name, path)
        write_reduced_model(source, token_ids, path)
        record.write_text(
            json.dumps({"format": FORMAT, "source": str(source), "size": size, "corpus": corpus}, indent=2) + "\n"
        )
    return DraftVocabulary(path, token_ids, corpus)


class TokenEmbeddings:
    """A GGUF model's input embedding rows, dequantized on demand: ``rows(tokens)  # [n, n_embd] float32``."""

    def __init__(self, model_path: Path):
        gguf = _gguf()
        self._dequantize = gguf.quants.dequantize
        reader = gguf.GGUFReader(str(model_path))
        tensor = next((t for t in reader.tensors if t.name == EMBEDDING_TENSOR), None)
        if tensor is None:
            raise UserError(f"{model_path} has no {EMBEDDING_TENSOR}")
        self._data = tensor.data  # memory-mapped [n_vocab, bytes per row]
        self._type = tensor.tensor_type
        self.n_vocab = int(tensor.shape[-1])
        self.n_embd = int(tensor.shape[0])

    def rows(self, tokens: Sequence[int]) -> np.ndarray:
        rows = self._dequantize(np.asarray(self._data[np.asarray(tokens, dtype=np.int64)]), self._type)
        return np.ascontiguousarray(rows.reshape(len(tokens), self.n_embd), dtype=np.float32)
