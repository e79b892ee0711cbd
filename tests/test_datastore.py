"""Suffix-array indexes and datastores: exact lookups, skipped files, incremental updates, stale detection."""

import os
import subprocess

import numpy as np
import pytest

from codeaccel.retrieval.datastore import Datastore, build_datastore, update_datastore
from codeaccel.retrieval.sources import scan_repository
from codeaccel.retrieval.suffix_index import StaleIndexError, SuffixIndex, build_index


def char_tokens(text: str) -> list[int]:
    """A stand-in tokenizer: one token per character."""
    return [ord(c) for c in text]


# ---- SuffixIndex -----------------------------------------------------------------------------
def test_docstring_example(tmp_path):
    build_index([np.array([5, 3, 9, 3, 9, 1], np.uint32)], tmp_path / "ix", tokenizer="t")
    ix = SuffixIndex(tmp_path / "ix", tokenizer="t")
    assert list(ix.sa[:6]) == [5, 3, 1, 0, 4, 2]
    lo, hi = ix.find([3, 9])
    assert (lo, hi) == (1, 3)
    assert ix.continuations(lo, hi, offset=2, length=8) == {(1,): 1, (3, 9, 1): 1}


def _brute_force(docs, pattern, length):
    out = {}
    for doc in docs:
        for i in range(len(doc) - len(pattern) + 1):
            if list(doc[i : i + len(pattern)]) == list(pattern):
                cont = tuple(int(x) for x in doc[i + len(pattern) : i + len(pattern) + length])
                if cont:
                    out[cont] = out.get(cont, 0) + 1
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_find_and_continuations_match_brute_force(tmp_path, seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 6, rng.integers(50, 400)).astype(np.uint32) for _ in range(20)]  # small alphabet
    build_index(docs, tmp_path / "ix", tokenizer="t")
    ix = SuffixIndex(tmp_path / "ix")
    for _ in range(200):
        doc = docs[rng.integers(len(docs))]
        start = int(rng.integers(0, len(doc) - 6))
        pattern = list(doc[start : start + int(rng.integers(1, 6))])
        if rng.random() < 0.3:
            pattern[-1] = 7  # absent token
        lo, hi = ix.find(pattern)
        expected = _brute_force(docs, pattern, 4)
        assert ix.continuations(lo, hi, len(pattern), 4, max_samples=10**6) == expected
        assert hi - lo >= sum(expected.values())  # occurrences at a document's very end have no continuation


def test_continuations_never_cross_documents(tmp_path):
    build_index([np.array([1, 2, 3], np.uint32), np.array([4, 5], np.uint32)], tmp_path / "ix", tokenizer="t")
    ix = SuffixIndex(tmp_path / "ix")
    lo, hi = ix.find([2, 3])
    assert ix.continuations(lo, hi, 2, 5) == {}  # document 0 ends after 3
    assert ix.find([3, 4]) == (ix.find([3, 4])[0],) * 2  # no match across the boundary


def test_corrupt_or_foreign_index_is_refused(tmp_path):
    build_index([np.arange(100, dtype=np.uint32)], tmp_path / "ix", tokenizer="t")
    with pytest.raises(StaleIndexError, match="another tokenizer"):
        SuffixIndex(tmp_path / "ix", tokenizer="other")
    data = bytearray((tmp_path / "ix" / "sa.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ix" / "sa.npy").write_bytes(bytes(data))
    with pytest.raises(StaleIndexError, match="corrupt"):
        SuffixIndex(tmp_path / "ix")


# ---- sources and datastores -------------------------------------------------------------------
@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "core.py").write_text("def alpha_function(x):\n    return x * 42\n")
    (root / "pkg" / "util.py").write_text("def beta_helper(y):\n    return y - 7\n")
    (root / "build").mkdir()
    (root / "build" / "gen.py").write_text("def ignored_generated():\n    pass\n")
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "run.log").write_text("def in_a_log_file(): pass\n")
    (root / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "latin.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "huge.py").write_text("x = 1\n" * 200_000)
    return root


@pytest.mark.parametrize("git", [False, True], ids=["gitignore-files", "git-work-tree"])
def test_repository_scan_respects_gitignore_and_counts_skips(project, tmp_path, git):
    if git:
        subprocess.run(["git", "init", "-q", str(project)], check=True)
    store = build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    assert set(store.manifest["files"]) == {"pkg/core.py", "pkg/util.py"}  # build/ and *.log are ignored
    assert store.stats()["skipped"] == {"binary": 1, "undecodable": 1, "huge": 1, "other suffix": 1}  # .gitignore
    assert store.stats()["files"] == 2 and store.stats()["tokens"] == sum(
        len((project / "pkg" / f).read_text()) for f in ("core.py", "util.py")
    )


def test_lookup_finds_the_longest_suffix_and_its_continuation(project, tmp_path):
    store = build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    hit = store.lookup(char_tokens("some text; def alpha_func"), max_len=32)
    assert hit.match_len == len("def alpha_func")  # "; def alpha_func" does not occur
    assert hit.continuations == {tuple(char_tokens("tion(x):\n    ret")): 1}
    assert store.lookup(char_tokens("zzzz\u2603"), min_len=1) is None


def test_update_reindexes_only_what_changed(project, tmp_path):
    build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    seen: list[str] = []

    def counting_tokenizer(text):
        seen.append(text)
        return char_tokens(text)

    (project / "pkg" / "core.py").write_text("def gamma_renamed(x):\n    return x * 43\n")
    (project / "pkg" / "new.py").write_text("def delta_added():\n    return 0\n")
    (project / "pkg" / "util.py").unlink()
    store, summary = update_datastore(tmp_path / "ds", counting_tokenizer, "chars")
    # the delta outgrew a quarter of this tiny base, so the update also merged it
    assert summary == {"changed": 1, "added": 1, "removed": 1, "compacted": True}
    assert len(seen) == 2  # only the edited and the new file were tokenized
    assert set(store.manifest["files"]) == {"pkg/core.py", "pkg/new.py"}

    def match_len(query):
        hit = store.lookup(char_tokens(query), max_len=64)
        return hit.match_len if hit else 0

    assert match_len("def gamma_ren") == 13 and match_len("def delta_add") == 13
    assert match_len("def alpha_fun") <= 4  # the old version of core.py is gone
    assert match_len("def beta_hel") <= 4  # util.py was deleted
    store, summary = update_datastore(tmp_path / "ds", counting_tokenizer, "chars")
    assert summary == {"changed": 0, "added": 0, "removed": 0} and len(seen) == 2  # nothing to do


def test_a_directory_ignored_by_an_enclosing_repository_is_scanned_on_its_own(tmp_path):
    outer = tmp_path / "outer"
    (outer / ".venv" / "pkg").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    (outer / ".gitignore").write_text(".venv/\n")
    (outer / ".venv" / "pkg" / "mod.py").write_text("x = 1\n")
    assert [name for name, _ in scan_repository(outer / ".venv" / "pkg").root_files] == ["mod.py"]
    assert scan_repository(outer).root_files == []  # from the outer repository, .venv is ignored


def test_small_edit_to_a_large_base_does_not_rebuild_it(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"def function_{i}(a, b):\n    return a + b * {i}\n" * 20)
    build_datastore(tmp_path / "ds", "big", "repository", [root], char_tokens, "chars")
    base_mtime = (tmp_path / "ds" / "base" / "sa.npy").stat().st_mtime_ns
    (root / "m3.py").write_text("def edited():\n    return 'new'\n")
    store, summary = update_datastore(tmp_path / "ds", char_tokens, "chars")
    assert summary == {"changed": 1, "added": 0, "removed": 0}
    assert (tmp_path / "ds" / "base" / "sa.npy").stat().st_mtime_ns == base_mtime
    assert store.stats()["shards"]["delta"] > 0 and store.stats()["dead_documents"] == 1
    assert store.lookup(char_tokens("def edite"), max_len=16).match_len == 9
    (root / "m5.py").write_text("def edited_again():\n    return 'newer'\n")  # a second update, no compaction
    store, summary = update_datastore(tmp_path / "ds", char_tokens, "chars")
    assert summary == {"changed": 1, "added": 0, "removed": 0} and store.stats()["dead_documents"] == 2
    for old in ("return a + b * 3\n", "return a + b * 5\n"):  # neither old version comes back
        hit = store.lookup(char_tokens("def function_3(a, b):\n    " + old), max_len=64)
        assert hit is None or hit.match_len < len("def function_3(a, b):\n    " + old)


def test_stale_datastore_is_detected(project, tmp_path):
    build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    with pytest.raises(StaleIndexError, match="another tokenizer"):
        Datastore(tmp_path / "ds", tokenizer="other")
    os.remove(tmp_path / "ds" / "base" / "tokens.npy")
    with pytest.raises(StaleIndexError):
        Datastore(tmp_path / "ds", tokenizer="chars")


def test_lookup_can_exclude_a_file(project, tmp_path):
    store = build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    assert store.lookup(char_tokens("def alpha_fun"), max_len=32).match_len == 13
    hit = store.lookup(char_tokens("def alpha_fun"), max_len=32, exclude_files=frozenset({"pkg/core.py"}))
    assert hit is None or hit.match_len <= 4  # only "def " (from util.py) is left to match


def test_a_name_with_a_folder_excludes_that_file_under_any_root(tmp_path):
    """A general store names files by their whole path: "pkg/core.py" excludes ".../site/pkg/core.py", and a
    bare name only itself (it would match too much)."""
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "core.py").write_text("def unique_answer_here():\n    return 1\n")
    (site / "other.py").write_text("x = 2\n")
    store = build_datastore(tmp_path / "ds", "general", "general", [site], char_tokens, "chars")
    query = char_tokens("def unique_answer_h")
    assert store.lookup(query, max_len=32).match_len == len("def unique_answer_h")
    hidden = store.lookup(query, max_len=32, exclude_files=frozenset({"core.py", "pkg/core.py"}))
    assert hidden is None or hidden.match_len <= len("def ")
    bare = store.lookup(query, max_len=32, exclude_files=frozenset({"core.py"}))  # the repository store's name
    assert bare.match_len == len("def unique_answer_h")


def test_general_scan_excludes_globs_and_nested_site_packages(tmp_path):
    from codeaccel.retrieval.sources import scan_general

    root = tmp_path / "lib"
    (root / "site-packages" / "other").mkdir(parents=True)
    (root / "mod.py").write_text("x = 1\n")
    (root / "skipme.py").write_text("y = 2\n")
    (root / "site-packages" / "other" / "pkg.py").write_text("z = 3\n")
    scan = scan_general([root], exclude=["*/skipme.py"])
    assert [p.name for _, p in scan.root_files] == ["mod.py"]
    assert scan.skipped == {"excluded": 1}


def test_open_rebuilds_a_damaged_datastore_and_refuses_a_foreign_one(project, tmp_path, caplog):
    from codeaccel.errors import CodeaccelError
    from codeaccel.retrieval.datastore import open_datastore

    path = tmp_path / "ds"
    build_datastore(path, "proj", "repository", [project], char_tokens, "chars")
    expected = open_datastore(path, char_tokens, "chars").lookup(char_tokens("def alpha_fun"), max_len=32)
    for damage in ("corrupt", "half-written"):
        if damage == "corrupt":
            with open(path / "base" / "tokens.npy", "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\xff\xff\xff\x7f")  # same size, different content: only the checksum sees it
        else:
            (path / "manifest.json").unlink()  # an update that died between its two writes
        with caplog.at_level("WARNING", logger="codeaccel.retrieval.datastore"):
            store = open_datastore(path, char_tokens, "chars")
        assert "rebuilding it from" in caplog.text
        caplog.clear()
        assert store.lookup(char_tokens("def alpha_fun"), max_len=32) == expected
    with pytest.raises(CodeaccelError, match="another model's tokenizer"):
        open_datastore(path, char_tokens, "other")
    assert Datastore(path, tokenizer="chars").stats()["files"] > 0  # refused, not overwritten
    (path / "source.json").unlink()
    os.remove(path / "base" / "sa.npy")
    with pytest.raises(CodeaccelError, match="index build"):
        open_datastore(path, char_tokens, "chars")
    with pytest.raises(CodeaccelError, match="no datastore at"):
        open_datastore(tmp_path / "nothing", char_tokens, "chars")


def test_open_brings_a_repository_datastore_up_to_date(project, tmp_path):
    from codeaccel.retrieval.datastore import open_datastore

    build_datastore(tmp_path / "ds", "proj", "repository", [project], char_tokens, "chars")
    (project / "pkg" / "fresh.py").write_text("def freshly_written_helper():\n    return 42\n")
    store = open_datastore(tmp_path / "ds", char_tokens, "chars")
    assert store.lookup(char_tokens("def freshly_wri"), max_len=32).match_len == 15
    assert (
        open_datastore(tmp_path / "ds", char_tokens, "chars", update=False).stats()["files"] == store.stats()["files"]
    )


def _without(key: str):
    return lambda manifest: {k: v for k, v in manifest.items() if k != key}


def _entry_without_tokens(manifest: dict) -> dict:
    files = {n: {k: v for k, v in f.items() if k != "tokens"} for n, f in manifest["files"].items()}
    return {**manifest, "files": files}


@pytest.mark.parametrize(
    "damage",
    [lambda m: [m], lambda m: "manifest", _without("files"), _without("name"), _without("dead"), _entry_without_tokens],
)
def test_a_manifest_of_another_shape_is_refused_naming_it_and_rebuilt_from_its_source(damage, project, tmp_path):
    import json

    from codeaccel.errors import CodeaccelError
    from codeaccel.retrieval.datastore import open_datastore

    path = tmp_path / "ds"
    build_datastore(path, "proj", "repository", [project], char_tokens, "chars")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(damage(manifest)))
    with pytest.raises(StaleIndexError, match="manifest.json") as refused:
        Datastore(path, tokenizer="chars")
    assert "\n" not in str(refused.value)
    assert open_datastore(path, char_tokens, "chars").stats()["files"] == len(manifest["files"])  # rebuilt
    (path / "manifest.json").write_text(json.dumps(damage(manifest)))
    (path / "source.json").unlink()  # nothing to rebuild from: a one-line error, no traceback
    with pytest.raises(CodeaccelError, match="manifest.json"):
        open_datastore(path, char_tokens, "chars")


def test_the_fingerprint_tells_contents_apart_not_rebuilds_of_the_same(project, tmp_path):
    first = build_datastore(tmp_path / "a", "proj", "repository", [project], char_tokens, "chars").fingerprint
    again = build_datastore(tmp_path / "b", "proj", "repository", [project], char_tokens, "chars").fingerprint
    assert first == again == Datastore(tmp_path / "a").fingerprint and len(first) == 12
    (project / "pkg" / "core.py").write_text("def gamma_renamed(x):\n    return x * 43\n")
    updated, _ = update_datastore(tmp_path / "a", char_tokens, "chars")
    assert updated.fingerprint != first  # same name, other files: another setting for a benchmark's records
