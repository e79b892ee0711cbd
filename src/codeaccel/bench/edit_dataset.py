"""Edit sets from a project's git history: a file, a commit message, and the function as the commit left it.

Each problem is one real edit: the model sees a Python file as it was before a commit
and the commit's message, and writes the updated version of one function. The
output mostly repeats text the prompt already holds (the old function), so drafts
from the request's own context and from a predicted output (``Problem.prediction``,
the old function) pay most here.

A candidate is a function or method (``Class.method``) that a non-merge commit
modified in a file under ``paths_glob``: present once in the file before and after,
3-40 lines after, a real edit (difflib ratio of old and new text in 0.5-0.98, not a
whitespace- or formatting-only change), a file before of at most ``max_file_chars``
characters, and a prompt plus answer that fit the context. Commits whose subject
says merge, release, version bump or formatting (black, isort, pre-commit, typo, …)
are skipped; at most one function per commit (the first in file order), identical
edits once. ``n`` candidates spread evenly over the history (oldest first) are kept.

There are no tests: a completion (the code inside the reply's fence) is scored by
``exact_match`` / ``edit_similarity`` against the new function, both dedented and
whitespace-trimmed (:func:`similarity_scores`).

The committed set ``codeaccel/data/edits/edits-click.jsonl.gz`` comes from the history of pallets/click
(https://github.com/pallets/click, BSD-3-Clause, Copyright 2014 Pallets; licence and
attribution in ``codeaccel/data/edits/README.md``), built at commit 2c8cd3ac958a7eb316d67f2d316c27086c4c0369 with::

    codeaccel dataset build-edits --git-dir /work/.mirror/pallets+click/repo \\
        --glob 'click/*.py' --glob 'src/click/*.py' --name click --n 40 \\
        --model qwen2.5-coder-1.5b-instruct --out src/codeaccel/data/edits/edits-click.jsonl.gz

Both globs: click's package lived in ``click/`` until March 2020, in ``src/click/`` since,
and its files under ~12000 characters are few since then (29 candidates from ``src/click``
alone; 136 from both, 1075 commits scanned). ``--model`` counts prompt tokens with the
bundled tokenizer (without it: 3 characters a token, which leaves out more files). The
same command gives the same bytes.
"""

from __future__ import annotations

import ast
import difflib
import gzip
import io
import json
import logging
import math
import re
import subprocess
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from codeaccel.bench.problem import Problem
from codeaccel.bench.repo_dataset import similarity
from codeaccel.errors import SetupError, UserError

log = logging.getLogger(__name__)

DATASET_PREFIX = "edits:"
FENCE = "```python\n"
MIN_LINES, MAX_LINES = 3, 40  # of the new function
MIN_RATIO, MAX_RATIO = 0.5, 0.98  # difflib ratio of old and new function text: an edit, not a rewrite
MAX_FILE_CHARS = 12000
MAX_MESSAGE_CHARS = 600
N_CTX = 4096
# chat template, fences and the closing line, plus slack for an answer a little longer than the reference
PROMPT_OVERHEAD_TOKENS = 160
SKIP_SUBJECT = re.compile(
    r"\bmerged?\b|\brelease\b|\bbump|\bversion bump|^(start|update|set) version\b|^version\s+\d|\bblack\b"
    r"|pre-commit|\bisort\b|reformat|\btypos?\b|\bformatting\b|^format\b|\bflake8\b|\bpyupgrade\b"
    r"|\bruff\b|reorder-python-imports|\bwhitespace\b|\bprettier\b",
    re.IGNORECASE,
)
TRAILER = re.compile(r"^(co-authored-by|signed-off-by|reviewed-by|cherry picked from)\b.*$", re.IGNORECASE | re.M)


def estimate_tokens(text: str) -> int:
    """A conservative token count without a tokenizer: 3 characters a token (code averages more)."""
    return math.ceil(len(text) / 3.0)


# --- the problems ---------------------------------------------------------------------------------


def data_path(name: str):
    """The packaged edit set ``codeaccel/data/edits/edits-<name>.jsonl.gz`` (a resources Traversable)."""
    return resources.files("codeaccel") / "data" / "edits" / f"edits-{name}.jsonl.gz"


def available_sets() -> list[str]:
    data = resources.files("codeaccel") / "data" / "edits"
    names = [p.name for p in data.iterdir()] if data.is_dir() else []
    return sorted(
        n[len("edits-") : -len(".jsonl.gz")] for n in names if n.startswith("edits-") and n.endswith(".jsonl.gz")
    )


def read_records(path) -> list[dict]:
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_records(records: list[dict], out: Path) -> None:
    """JSON lines, gzipped reproducibly (no name or time in the header): the same set gives the same bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def user_message(record: dict) -> str:
    """The user turn: the file before the commit, the commit message, and which function to write."""
    qualname = record["qualname"]
    kind = "method" if "." in qualname else "function"
    file = record["file_before"] if record["file_before"].endswith("\n") else record["file_before"] + "\n"
    return (
        f"Here is the file `{record['path']}` of a Python project:\n{FENCE}{file}```\n\n"
        f"A commit changes it. The commit message:\n\n{record['message']}\n\n"
        f"Output the updated version of the {kind} `{qualname}` only, as the commit leaves it: the complete "
        f"{kind} (decorators, signature, docstring and body), unindented, in one Python code block, "
        "with no explanation."
    )


def load_edit_problems(name: str = "click", limit: int | None = None) -> list[Problem]:
    """The packaged edit set ``name`` as problems (``edits:<name>``), in the set's order."""
    available = available_sets()
    if name not in available:
        raise UserError(
            f"unknown edit set {name!r}: choose from {', '.join(f'edits:{a}' for a in available) or 'none'}"
        )
    return problems_from_records(read_records(data_path(name))[:limit], name)


def problems_from_records(records: list[dict], name: str) -> list[Problem]:
    """One problem per edit record: the chat prompt, the reply started with a fence, old and new text dedented."""
    return [
        Problem(
            dataset=f"{DATASET_PREFIX}{name}",
            task_id=r["task_id"],
            user_message=user_message(r),
            response_prefix=FENCE,
            code_prefix="",
            reference=textwrap.dedent(r["new_function"]),
            prediction=textwrap.dedent(r["old_function"]),
            stop=("\n```",),
        )
        for r in records
    ]


def edit_similarity(completion: str, reference: str) -> dict:
    """:func:`similarity` of the completion and the reference, both dedented (a method may come indented)."""
    return similarity(textwrap.dedent(completion), textwrap.dedent(reference))


def similarity_scores(problem: Problem, completion: str) -> dict:
    """exact_match / edit_similarity of a problem scored by similarity (an edit set's: dedented first)."""
    if problem.dataset.startswith(DATASET_PREFIX):
        return edit_similarity(completion, problem.reference or "")
    return similarity(completion, problem.reference or "")


# --- building a set from git history ---------------------------------------------------------------


def _git(git_dir: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, check=False)
    except FileNotFoundError:
        raise SetupError("building an edit set needs git on PATH") from None
    if done.returncode != 0:
        msg = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UserError(f"git {' '.join(args[:2])} failed in {git_dir}: {msg[-1] if msg else done.returncode}")
    return done.stdout.decode("utf-8", "replace")


def resolve_git_dir(path: Path) -> Path:
    """The git directory of ``path``: a bare repository, a ``.git`` folder, or a work tree holding one."""
    path = Path(path).expanduser()
    for candidate in (path, path / ".git"):
        if candidate.is_dir():
            try:
                done = subprocess.run(
                    ["git", f"--git-dir={candidate}", "rev-parse", "--git-dir"], capture_output=True, check=False
                )
            except OSError as e:
                raise SetupError(f"cannot run git: {e}") from None
            if done.returncode == 0:
                return candidate.resolve()
    raise UserError(f"{path} is not a git repository (give a bare repository or a work tree with a .git folder)")


def _functions(tree: ast.Module, lines: list[str]) -> dict[str, list[tuple[ast.AST, str]]]:
    """Functions and methods by qualname (nested classes included, functions inside functions not)."""
    found: dict[str, list[tuple[ast.AST, str]]] = {}
    scopes = [(node, "") for node in tree.body]
    while scopes:
        node, prefix = scopes.pop(0)
        if isinstance(node, ast.ClassDef):
            scopes += [(child, f"{prefix}{node.name}.") for child in node.body]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            text = "".join(lines[start - 1 : node.end_lineno])
            found.setdefault(f"{prefix}{node.name}", []).append((node, text))
    return found


def _comments(text: str) -> list[str]:
    try:
        tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(text)).readline)
        return [t.string for t in tokens if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []


def _parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError):
        return None


def _message(full: str) -> str:
    """The commit message as an instruction: trailers removed, blank runs collapsed, at most ~600 characters."""
    text = re.sub(r"\n{3,}", "\n\n", TRAILER.sub("", full.replace("\r\n", "\n"))).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        cut = text.rfind(" ", 0, MAX_MESSAGE_CHARS)
        text = text[: cut if cut > MAX_MESSAGE_CHARS // 2 else MAX_MESSAGE_CHARS].rstrip() + " …"
    return text


@dataclass
class EditScan:
    """What a walk over the history found: the candidates (history order) and why others were skipped."""

    commits: int = 0  # non-merge commits that modify a matching file
    candidates: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _edits_in_file(
    path: str, before: str, after: str, scan: EditScan, max_file_chars: int
) -> list[tuple[str, str, str, int]]:
    """(qualname, old text, new text, indent) of each function this change really edits, in file order."""
    if len(before) > max_file_chars:
        scan.skip("file too long")
        return []
    if "```" in before:
        scan.skip("file holds a code fence")
        return []
    old_tree, new_tree = _parse(before), _parse(after)
    if old_tree is None or new_tree is None:
        scan.skip("file does not parse")
        return []
    old_fns = _functions(old_tree, before.splitlines(keepends=True))
    new_fns = _functions(new_tree, after.splitlines(keepends=True))
    edits = []
    for qualname, [(old_node, old_text)] in ((q, v) for q, v in old_fns.items() if len(v) == 1):
        if len(new_fns.get(qualname, ())) != 1:
            continue  # removed, renamed or ambiguous (a property's getter and setter)
        [(new_node, new_text)] = new_fns[qualname]
        if old_text == new_text:
            continue
        if re.sub(r"\s+", "", old_text) == re.sub(r"\s+", "", new_text) or (
            ast.dump(old_node) == ast.dump(new_node) and _comments(old_text) == _comments(new_text)
        ):
            scan.skip("formatting only")
            continue
        if not MIN_LINES <= len(new_text.splitlines()) <= MAX_LINES:
            scan.skip("function size")
            continue
        ratio = difflib.SequenceMatcher(None, old_text, new_text, autojunk=False).ratio()
        if not MIN_RATIO <= ratio <= MAX_RATIO:
            scan.skip("rewrite" if ratio < MIN_RATIO else "edit too small")
            continue
        edits.append((qualname, old_text, new_text, old_node.col_offset))
    return edits


def scan_history(
    git_dir: Path,
    paths_glob: str | Sequence[str] = "src/click/*.py",
    name: str = "click",
    *,
    rev: str = "HEAD",
    max_file_chars: int = MAX_FILE_CHARS,
    count_tokens: Callable[[str], int] | None = None,
    n_ctx: int = N_CTX,
) -> EditScan:
    """Every candidate edit of the history of ``rev``, oldest first (see the module docstring)."""
    git_dir = resolve_git_dir(git_dir)
    count = count_tokens or estimate_tokens
    globs = [paths_glob] if isinstance(paths_glob, str) else list(paths_glob)
    if not globs:
        raise UserError("no path glob given")
    spec = [f":(glob){g}" for g in globs]
    shas = _git(git_dir, "rev-list", "--no-merges", "--reverse", "--date-order", rev, "--", *spec).split()
    scan = EditScan()
    seen: set[tuple[str, str]] = set()
    for sha in shas:
        parents, date, full = _git(git_dir, "show", "-s", "--date=short", "--format=%P%x00%ad%x00%B", sha).split(
            "\0", 2
        )
        if not parents.strip():
            continue  # the root commit: nothing before it
        changes = _git(git_dir, "diff-tree", "-r", "-M", "--name-status", parents.split()[0], sha, "--", *spec)
        modified = [line.split("\t")[1] for line in changes.splitlines() if line.startswith("M\t")]
        if not modified:
            if changes.strip():
                scan.commits += 1
                scan.skip("no modified file (added, deleted or renamed)")
            continue
        scan.commits += 1
        subject = full.strip().splitlines()[0] if full.strip() else ""
        if not subject or SKIP_SUBJECT.search(subject):
            scan.skip("subject: merge, release, version or formatting")
            continue
        message = _message(full)
        chosen = None
        for path in sorted(modified):
            before = _git(git_dir, "show", f"{parents.split()[0]}:{path}")
            after = _git(git_dir, "show", f"{sha}:{path}")
            for qualname, old, new, indent in _edits_in_file(path, before, after, scan, max_file_chars):
                if (old, new) in seen:
                    scan.skip("duplicate edit")
                    continue
                record = {
                    "task_id": f"{name}/{sha[:8]}:{qualname}",
                    "commit": sha,
                    "date": date,
                    "subject": subject,
                    "message": message,
                    "path": path,
                    "qualname": qualname,
                    "file_before": before,
                    "old_function": old,
                    "new_function": new,
                    "indent": indent,
                }
                if count(user_message(record) + FENCE + new) + PROMPT_OVERHEAD_TOKENS > n_ctx:
                    scan.skip("prompt does not fit the context")
                    continue
                seen.add((old, new))
                chosen = record
                break
            if chosen:
                break
        if chosen:
            scan.candidates.append(chosen)
        else:
            scan.skip("no candidate function")
    return scan


def spread(candidates: list[dict], n: int) -> list[dict]:
    """``n`` of the candidates, evenly spaced over their order (all of them when there are fewer)."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if len(candidates) <= n:
        return list(candidates)
    step = len(candidates) / n
    return [candidates[int(i * step)] for i in range(n)]


def build_edit_set(
    git_dir: Path,
    paths_glob: str | Sequence[str] = "src/click/*.py",
    n: int = 40,
    name: str = "click",
    *,
    rev: str = "HEAD",
    max_file_chars: int = MAX_FILE_CHARS,
    count_tokens: Callable[[str], int] | None = None,
    n_ctx: int = N_CTX,
) -> tuple[EditScan, list[dict]]:
    """The history scan, and ``n`` of its edit records spread evenly over it (fewer when fewer are found;
    none is an error)."""
    if n < 1:
        raise UserError(f"the number of edits must be >= 1, got {n}")
    scan = scan_history(
        git_dir, paths_glob, name, rev=rev, max_file_chars=max_file_chars, count_tokens=count_tokens, n_ctx=n_ctx
    )
    if not scan.candidates:
        globs = ", ".join([paths_glob] if isinstance(paths_glob, str) else paths_glob)
        raise UserError(f"no edit candidates in {git_dir} for {globs} ({scan.commits} commits scanned)")
    if len(scan.candidates) < n:
        log.warning("only %d edit candidates found, fewer than the %d asked for", len(scan.candidates), n)
    return scan, spread(scan.candidates, n)
