"""A datastore: one source of code (general or repository) as token-level suffix indexes on disk.

Directory layout::

    source.json     name, kind, roots, excluded globs, tokenizer fingerprint: what to
                    rebuild from (written first, kept when the rest is damaged)
    manifest.json   kind, roots, tokenizer fingerprint, every indexed file
                    (content sha256, size, mtime, shard, document id), dead documents,
                    skipped files by reason, build and update times
    base/           a SuffixIndex over the files as first built
    delta/          a SuffixIndex over files added or changed since (absent if none)

``update`` re-scans the roots and hashes changed files: an edited or new file is
tokenized into a rebuilt *delta* (small); its old version, and any deleted file,
becomes a dead document that lookups skip. When the delta outgrows a quarter of the
base, both are merged into a new base from the token arrays already on disk (no
re-tokenizing). A manifest or index that does not match (format, tokenizer,
checksums) raises :class:`StaleIndexError`; :func:`open_datastore`, which every user of
a datastore goes through, rebuilds it from ``source.json`` rather than use it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from codeaccel.engines.tokenizer import engine_fingerprint
from codeaccel.errors import SetupError, UserError
from codeaccel.models.registry import cache_dir
from codeaccel.retrieval.sources import FileScan, default_general_roots, read_text, scan_general, scan_repository
from codeaccel.retrieval.suffix_index import StaleIndexError, SuffixIndex, build_index

log = logging.getLogger(__name__)

Kind = Literal["general", "repository"]  # what a datastore holds
# where a retrieved continuation came from: a datastore, or the request itself (retrieval.context)
SourceKind = Literal["general", "repository", "context", "prediction"]
FORMAT = "codeaccel-datastore/v1"
SOURCE_FILE = "source.json"  # name, kind, roots, exclude, tokenizer: enough to rebuild
COMPACT_RATIO = 0.25  # merge the delta into the base when it holds this share of the base's tokens

Tokenize = Callable[[str], list[int]]
Progress = Callable[[int, int], None]  # (files done, files total)


@dataclass(frozen=True)
class Retrieved:
    """The longest context suffix found in a datastore, and what followed it there."""

    source: str  # datastore name (the kind, for the request's own sources)
    kind: SourceKind
    match_len: int  # tokens of the context's suffix that matched
    occurrences: int  # how many times that suffix occurs (dead documents included)
    continuations: Counter  # tuple of token ids -> times seen after the suffix (sampled)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# what every manifest holds (build_datastore writes them all), and the type each is read as
_MANIFEST_KEYS: dict[str, type] = {
    "name": str,
    "kind": str,
    "tokenizer": str,
    "roots": list,
    "files": dict,
    "dead": dict,
    "skipped": dict,
}
_ENTRY_KEYS = frozenset({"sha256", "size", "mtime_ns", "shard", "doc", "tokens"})  # per indexed file


def _manifest_problem(manifest: object) -> str | None:
    """What makes a ``manifest.json`` value no manifest (None: nothing); its format is checked apart."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    if manifest.get("format") != FORMAT:
        return None  # another format: refused as such
    wrong = [key for key, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        return f"lacks {', '.join(wrong)} (or they are of another type)"
    if manifest["kind"] not in ("general", "repository"):
        return f"has an unknown kind {manifest['kind']!r}"
    if not all(isinstance(entry, dict) and _ENTRY_KEYS <= entry.keys() for entry in manifest["files"].values()):
        return f"has a file entry without {', '.join(sorted(_ENTRY_KEYS))}"
    if not all(isinstance(docs, list) for docs in manifest["dead"].values()):
        return "has dead documents that are not lists"
    if not isinstance(manifest.get("build_s"), (int, float)):
        return "lacks build_s"
    return None


class Datastore:
    """An opened datastore (read side: ``lookup``, ``stats``); ``build`` / ``update`` write one."""

    def __init__(self, path: Path, tokenizer: str | None = None, verify: bool = True):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise StaleIndexError(f"datastore {self.path} is missing or unreadable: {exc}") from None
        problem = _manifest_problem(self.manifest)
        if problem:  # damaged like an unreadable one: open_datastore rebuilds it from its source
            raise StaleIndexError(f"datastore {self.path}: {self.path / 'manifest.json'} {problem}")
        if self.manifest.get("format") != FORMAT:
            raise StaleIndexError(f"datastore {self.path} has an unknown format; rebuild it")
        if tokenizer is not None and self.manifest["tokenizer"] != tokenizer:
            raise StaleIndexError(f"datastore {self.path} was built with another tokenizer; rebuild it")
        self.name = self.manifest["name"]
        self.kind: Kind = self.manifest["kind"]
        self.shards: dict[str, SuffixIndex] = {}
        for shard in ("base", "delta"):
            if (self.path / shard).is_dir():
                self.shards[shard] = SuffixIndex(self.path / shard, tokenizer=self.manifest["tokenizer"], verify=verify)
        self.dead = {shard: frozenset(self.manifest["dead"].get(shard, [])) for shard in self.shards}
        self._skips: dict[frozenset[str], dict[str, frozenset[int]]] = {}  # excluded names -> documents skipped

    def _skip(self, exclude_files: frozenset[str]) -> dict[str, frozenset[int]]:
        """Per shard, the documents a lookup skips: the dead ones, and those of ``exclude_files``. A name
        with a folder in it also matches every manifest name that ends with it ("rich/console.py": a general
        store's ".../site-packages/rich/console.py"), so a repository problem's own file never drafts its
        answer from a general store that indexed the package; a bare name matches itself only."""
        if not exclude_files:
            return self.dead
        if exclude_files not in self._skips:
            files = self.manifest["files"]
            suffixes = tuple("/" + n for n in exclude_files if "/" in n)
            names = {n for n in files if n in exclude_files or (suffixes and n.endswith(suffixes))}
            self._skips[exclude_files] = {
                shard: dead | {files[n]["doc"] for n in names if files[n]["shard"] == shard}
                for shard, dead in self.dead.items()
            }  # fmt: skip
        return self._skips[exclude_files]

    # ---- read side ------------------------------------------------------------------
    def _occurrences(self, pattern: Sequence[int]) -> list[tuple[str, int, int]]:
        found = []
        for name, index in self.shards.items():
            lo, hi = index.find(pattern)
            if hi > lo:
                found.append((name, lo, hi))
        return found

    def lookup(
        self,
        context: Sequence[int],
        max_len: int = 16,
        min_len: int = 1,
        cont_len: int = 16,
        max_samples: int = 64,
        exclude_files: frozenset[str] = frozenset(),
    ) -> Retrieved | None:
        """Continuations of the longest suffix of ``context`` (between min_len and max_len tokens) found here.

        Occurrence is monotone in the suffix length (a suffix that occurs has shorter
        suffixes that occur), so the longest length is found by binary search.
        Continuations inside ``exclude_files`` are not used (names as :meth:`_skip` matches them).
        """
        skip = self._skip(exclude_files)
        context = list(context[-max_len:])
        lo_len, hi_len = min_len - 1, len(context)  # invariant: lo_len occurs (or is min_len-1), hi_len+1 does not
        best: list[tuple[str, int, int]] = []
        while lo_len < hi_len:
            mid = (lo_len + hi_len + 1) // 2
            found = self._occurrences(context[-mid:])
            if found:
                lo_len, best = mid, found
            else:
                hi_len = mid - 1
        for length in range(lo_len, min_len - 1, -1):  # dead documents can hide every continuation
            found = best if length == lo_len else self._occurrences(context[-length:])
            counts: Counter = Counter()
            for shard, lo, hi in found:
                counts += self.shards[shard].continuations(lo, hi, length, cont_len, max_samples, skip[shard])
            if counts:
                occurrences = sum(hi - lo for _, lo, hi in found)
                return Retrieved(self.name, self.kind, length, occurrences, counts)
        return None

    def stats(self) -> dict:
        m = self.manifest
        return {
            "name": self.name,
            "kind": self.kind,
            "files": len(m["files"]),
            "tokens": sum(f["tokens"] for f in m["files"].values()),
            "bytes_on_disk": sum(s.bytes_on_disk() for s in self.shards.values()),
            "shards": {name: len(index) for name, index in self.shards.items()},
            "dead_documents": sum(len(d) for d in self.dead.values()),
            "skipped": m["skipped"],
            "build_s": m["build_s"],
            "last_update_s": m.get("last_update_s"),
            "roots": m["roots"],
        }

    @property
    def fingerprint(self) -> str:
        """Its content, hashed (12 hex digits): the tokenizer, each indexed file's name and SHA-256, the dead
        documents. A datastore rebuilt or updated on other files has another."""
        m = self.manifest
        content = {"tokenizer": m["tokenizer"], "files": {n: e["sha256"] for n, e in m["files"].items()},
                   "dead": {shard: sorted(docs) for shard, docs in m["dead"].items()}}  # fmt: skip
        return _sha256(json.dumps(content, sort_keys=True).encode())[:12]

    def close(self) -> None:
        """Drop the memory maps (before the files under them are replaced)."""
        self.shards.clear()

    def doc_tokens(self, shard: str, doc: int) -> np.ndarray:
        index = self.shards[shard]
        start = int(index.doc_starts[doc])
        end = int(index.doc_starts[doc + 1]) - 1 if doc + 1 < len(index.doc_starts) else len(index.tokens) - 1
        return np.array(index.tokens[start:end])  # a copy: the shard's file may be rebuilt


# ---- write side ----------------------------------------------------------------------
def _scan(kind: Kind, roots: Sequence[Path], exclude: Sequence[str] = ()) -> FileScan:
    if kind == "repository":
        if len(roots) != 1:
            raise UserError("a repository source has exactly one root directory")
        return scan_repository(roots[0])
    return scan_general(roots or default_general_roots(), exclude=exclude)


def _read_and_tokenize(
    scan: FileScan, tokenize: Tokenize, wanted: set[str] | None, progress: Progress | None
) -> tuple[dict[str, dict], dict[str, np.ndarray], Counter]:
    """Per indexable file: manifest entry and tokens (only names in ``wanted``, if given, are tokenized)."""
    entries: dict[str, dict] = {}
    tokens: dict[str, np.ndarray] = {}
    skipped = Counter(scan.skipped)
    total = len(scan.root_files)
    for i, (name, path) in enumerate(scan.root_files):
        if progress:
            progress(i, total)
        text, reason = read_text(path)
        if text is None:
            skipped[reason] += 1
            continue
        st = path.stat()
        entries[name] = {"sha256": _sha256(text.encode()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if wanted is None or name in wanted:
            tokens[name] = np.asarray(tokenize(text), dtype=np.uint32)
    if progress:
        progress(total, total)
    return entries, tokens, skipped


def _write_json(file: Path, doc: dict) -> None:
    """Write a JSON file atomically (temp file, then rename)."""
    tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, file)


def _write_manifest(path: Path, manifest: dict) -> None:
    _write_json(path / "manifest.json", manifest)


def build_datastore(
    path: Path,
    name: str,
    kind: Kind,
    roots: Sequence[Path],
    tokenize: Tokenize,
    tokenizer: str,
    progress: Progress | None = None,
    exclude: Sequence[str] = (),
) -> Datastore:
    """Index every file of the source from scratch into ``path`` (``exclude``: globs, general sources)."""
    if kind not in ("general", "repository"):
        raise UserError(f"source kind must be 'general' or 'repository', got {kind!r}")
    t0 = time.perf_counter()
    roots = [Path(r).resolve() for r in roots] or default_general_roots()
    scan = _scan(kind, roots, exclude)
    entries, tokens, skipped = _read_and_tokenize(scan, tokenize, None, progress)
    source = {"name": name, "kind": kind, "roots": [str(r) for r in roots], "exclude": list(exclude)}
    Path(path).mkdir(parents=True, exist_ok=True)
    _write_json(Path(path) / SOURCE_FILE, {**source, "tokenizer": tokenizer})  # first: a failed build can be redone
    manifest = {
        **source,
        "tokenizer": tokenizer,
        "skipped": dict(skipped),
        "build_s": round(time.perf_counter() - t0, 3),
        "last_update_s": None,
    }
    return _write(path, manifest, entries, {"base": tokens, "delta": {}}, {})


def _write(
    path: Path,
    manifest: dict,
    entries: dict[str, dict],
    shard_docs: dict[str, dict[str, np.ndarray] | None],
    dead: dict[str, list[int]],
) -> Datastore:
    """Rebuild the shards given in ``shard_docs`` (None: keep that shard as it is; {}: remove it), then the manifest.

    The manifest is removed first and written last, so a crash in between leaves a
    datastore that fails to open (and is rebuilt) rather than one that lies.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").unlink(missing_ok=True)
    for shard, docs in shard_docs.items():
        if docs is None:
            continue
        if docs:
            for doc_id, file_name in enumerate(docs):
                entries[file_name].update(shard=shard, doc=doc_id, tokens=len(docs[file_name]))
            build_index(list(docs.values()), path / shard, manifest["tokenizer"])
        elif (path / shard).exists():
            shutil.rmtree(path / shard)
    manifest = {
        **manifest,
        "format": FORMAT,
        "files": entries,
        "dead": dead,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_manifest(path, manifest)
    return Datastore(path, manifest["tokenizer"])


def update_datastore(
    path: Path,
    tokenize: Tokenize,
    tokenizer: str,
    progress: Progress | None = None,
    store: Datastore | None = None,
) -> tuple[Datastore, dict]:
    """Bring a datastore up to date with its roots; returns it and a summary of what changed.

    Unchanged files (same size and mtime, or same content hash) are not re-tokenized.
    store: the datastore at ``path`` already open (and checked); it is reused, or closed
    when the update writes a new one.
    """
    t0 = time.perf_counter()
    old = store if store is not None else Datastore(path, tokenizer, verify=False)
    previous = old.manifest["files"]
    scan = _scan(old.kind, [Path(r) for r in old.manifest["roots"]], old.manifest.get("exclude", ()))
    changed: set[str] = set()
    for name, file_path in scan.root_files:
        prev = previous.get(name)
        try:
            st = file_path.stat()
        except OSError:
            continue
        if prev and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
            continue
        if prev:
            text, _ = read_text(file_path)
            if text is not None and _sha256(text.encode()) == prev["sha256"]:
                continue
        changed.add(name)
    entries, new_tokens, skipped = _read_and_tokenize(scan, tokenize, changed, progress)
    removed = set(previous) - set(entries)
    new_names = set(new_tokens)  # changed files that are indexable (skipped ones have no tokens)
    summary = {
        "changed": len(new_names & set(previous)),
        "added": len(new_names - set(previous)),
        "removed": len(removed),
    }
    if not new_names and not removed:
        return old, summary
    unchanged = [n for n in entries if n not in changed]
    for n in unchanged:
        entries[n] = {**previous[n], **entries[n]}
    # live documents by shard, from the tokens already on disk (nothing unchanged is re-tokenized)
    base_live = {n for n in unchanged if previous[n]["shard"] == "base"}
    delta_docs = {n: old.doc_tokens("delta", previous[n]["doc"]) for n in unchanged if previous[n]["shard"] == "delta"}
    delta_docs.update(new_tokens)
    base_tokens = sum(previous[n]["tokens"] for n in base_live)
    manifest = {**old.manifest, "skipped": dict(skipped), "last_update_s": None}
    if sum(len(t) for t in delta_docs.values()) > COMPACT_RATIO * max(base_tokens, 1):
        summary["compacted"] = True
        base_docs = {n: old.doc_tokens("base", previous[n]["doc"]) for n in base_live}
        shard_docs = {"base": {**base_docs, **delta_docs}, "delta": {}}
        dead: dict[str, list[int]] = {}
    else:  # keep the base; its superseded and deleted documents become dead, and those dead before stay dead
        shard_docs = {"base": None, "delta": delta_docs}
        newly_dead = {f["doc"] for n, f in previous.items() if f["shard"] == "base" and n not in base_live}
        dead = {"base": sorted(newly_dead | set(old.manifest["dead"].get("base", [])))}
    old.close()
    manifest["last_update_s"] = round(time.perf_counter() - t0, 3)
    return _write(path, manifest, entries, shard_docs, dead), summary


def default_datastore_dir(name: str) -> Path:
    return cache_dir() / "datastores" / name


def _source_record(path: Path) -> dict | None:
    """What a datastore was built from (``source.json``, written before any index): None if unknown."""
    try:
        record = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    keys = ("name", "kind", "roots", "exclude", "tokenizer")
    return record if isinstance(record, dict) and all(k in record for k in keys) else None


def open_datastore(
    path: Path, tokenize: Tokenize, tokenizer: str, progress: Progress | None = None, update: bool | None = None
) -> Datastore:
    """Open a datastore for use: never a corrupt or out-of-date one.

    A datastore that fails its checks (missing or corrupt arrays, a half-written
    update, an old format) is rebuilt from the source it records, with a warning; a
    repository datastore is brought up to date with its files (:func:`update_datastore`:
    a stat of each file, re-tokenizing only what changed; ``update``: force it on or off
    for any kind). One built for another tokenizer is refused, not overwritten.
    """
    path = Path(path)
    source = _source_record(path)
    if source is None and not (path / "manifest.json").exists():
        raise UserError(f"no datastore at {path}: build one with `codeaccel index build`")
    if source is not None and source["tokenizer"] != tokenizer:
        raise UserError(
            f"datastore {path} was built for another model's tokenizer; build one for this model "
            "with `codeaccel index build ... --out <another directory>`"
        )
    try:
        store = Datastore(path, tokenizer)
    except StaleIndexError as exc:
        if source is None:
            raise SetupError(f"{exc}, and it records no source to rebuild from: `codeaccel index build` it") from None
        log.warning("%s: rebuilding it from %s", exc, ", ".join(source["roots"]))
        return build_datastore(
            path,
            source["name"],
            source["kind"],
            [Path(r) for r in source["roots"]],
            tokenize,
            tokenizer,
            progress,
            source["exclude"],
        )
    if store.kind == "repository" if update is None else update:
        store, summary = update_datastore(path, tokenize, tokenizer, progress, store=store)
        if any(summary.values()):
            log.info("datastore %s brought up to date: %s", store.name, summary)
    return store


def open_datastores(engine, paths: Sequence[str]) -> list[Datastore]:
    """Open the named datastores (default: the general one in the cache) for an engine's tokenizer."""
    fingerprint = engine_fingerprint(engine)
    paths = list(paths) or [str(default_datastore_dir(f"general-{fingerprint}"))]
    return [open_datastore(Path(p), engine.tokenize, fingerprint) for p in paths]
