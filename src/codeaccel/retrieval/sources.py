"""Where datastore text comes from: which files, and which of them to skip.

Two kinds of source:

* **general**: code the user already has offline. By default the Python standard
  library and the installed site-packages (``*.py``), plus any directories named.
* **repository**: the user's project: the files git tracks or would track
  (``git ls-files --cached --others --exclude-standard``); outside a git work tree,
  every file not matched by the project's ``.gitignore`` files (``pathspec``).

Binary files (a NUL byte in the first 8 KiB), huge files and files that are not
UTF-8 are skipped and counted by reason, never indexed.
"""

from __future__ import annotations

import fnmatch
import site
import subprocess
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from codeaccel.errors import UserError

MAX_FILE_BYTES = 1 << 20  # 1 MiB: larger files are generated code or data, not code to learn from
GENERAL_SUFFIXES = (".py",)
REPOSITORY_SUFFIXES = (
    ".py", ".pyi", ".pyx", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".json", ".yaml", ".yml",
    ".sh", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".tsx", ".html", ".css", ".sql",
)  # fmt: skip
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"}
_PACKAGE_DIRS = {"site-packages", "dist-packages"}


@dataclass
class FileScan:
    """The files of a source that will be indexed, and the ones skipped (by reason)."""

    root_files: list[tuple[str, Path]] = field(default_factory=list)  # (name in the index, absolute path)
    skipped: Counter = field(default_factory=Counter)  # reason -> files


def default_general_roots() -> list[Path]:
    """The standard library and the site-packages directories of this interpreter."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]:
        if Path(p).is_dir() and Path(p) not in roots:
            roots.append(Path(p))
    return roots


def scan_general(
    roots: Iterable[Path], suffixes: tuple[str, ...] = GENERAL_SUFFIXES, exclude: Sequence[str] = ()
) -> FileScan:
    """Every file with a code suffix under the roots.

    A package directory nested in a root (the base interpreter's ``site-packages``
    inside its standard library) is skipped: only the roots named are indexed.
    ``exclude``: glob patterns (``fnmatch`` on the absolute path) of files to leave out,
    e.g. a project that a benchmark uses as the repository source.
    """
    scan = FileScan()
    seen: set[Path] = set()
    for root in roots:
        root = Path(root).resolve()
        if not root.is_dir():
            raise UserError(f"not a directory: {root}")
        for path in _walk(root, skip=_PACKAGE_DIRS - set(root.parts[-1:])):
            if path in seen:
                continue
            seen.add(path)
            if any(fnmatch.fnmatch(str(path), pattern) for pattern in exclude):
                scan.skipped["excluded"] += 1
            elif path.suffix in suffixes:
                scan.root_files.append((str(path), path))
            else:
                scan.skipped["other suffix"] += 1
    return scan


def _walk(root: Path, skip: set[str] = frozenset()) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if any(part in _SKIP_DIRS or part in skip for part in path.relative_to(root).parts):
            continue
        if path.is_file() and not path.is_symlink():
            yield path.resolve()


def scan_repository(root: Path, suffixes: tuple[str, ...] = REPOSITORY_SUFFIXES) -> FileScan:
    """The project's files, respecting .gitignore; names are paths relative to the root."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"repository not found: {root}")
    names = _git_files(root)
    if names is None:
        names = _gitignore_files(root)
    scan = FileScan()
    for name in sorted(names):
        path = root / name
        if not path.is_file() or path.is_symlink():
            continue
        if path.suffix not in suffixes:
            scan.skipped["other suffix"] += 1
            continue
        scan.root_files.append((name, path))
    return scan


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_files(root: Path) -> list[str] | None:
    """The files git lists under root, or None when root is not a (non-ignored) part of a work tree.

    A directory that an enclosing repository ignores (a package inside a project's
    ``.venv``) is not that repository's: its own .gitignore files decide instead.
    """
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0:
        return None
    if Path(top.stdout.decode().strip()).resolve() != root:
        ignored = _git(root, "check-ignore", "-q", str(root))
        if ignored is None or ignored.returncode == 0:
            return None
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is None or out.returncode != 0:
        return None
    return [n for n in out.stdout.decode("utf-8", "replace").split("\0") if n]


def _gitignore_files(root: Path) -> list[str]:
    specs = []  # (directory, spec) for every .gitignore under the root
    for ignore in sorted(root.rglob(".gitignore")):
        lines = ignore.read_text(errors="replace").splitlines()
        specs.append((ignore.parent, pathspec.GitIgnoreSpec.from_lines(lines)))
    names = []
    for path in _walk(root):
        ignored = False
        for base, spec in specs:
            if base == path.parent or base in path.parents:
                ignored |= spec.match_file(str(path.relative_to(base)))
        if not ignored:
            names.append(str(path.relative_to(root)))
    return names


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str | None, str | None]:
    """(text, None) for an indexable file, else (None, reason): binary, huge, undecodable, unreadable."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, "huge"
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    if b"\0" in data[:8192]:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "undecodable"
