"""A repository-level completion set built from an installed Python project (CodeSwift's setting).

For a package installed from PyPI (default: ``rich``), every function or method
whose body has 3-25 lines is a candidate; an evenly spaced, deterministic sample of
them (60 by default) becomes problems. Each prompt is the file's text before the
function's body (earlier code, the signature and docstring; at most the last
``MAX_PROMPT_CHARS`` characters, from a line start), given to the model raw, without
a chat template; the model writes the body. The rest of the
project is the *repository* source, with the function's own file excluded for that
problem (``exclude_files``), so the answer is never in the datastore.

There are no tests: the set measures speed, and ``exact_match`` / ``edit_similarity``
of the completed body against the original say whether the output is sensible.
Generation stops at a line that leaves the function (a ``def``, ``class`` or
decorator at the function's indentation or less), or at max tokens.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

from codeaccel.bench.problem import Problem
from codeaccel.errors import UserError

MIN_BODY_LINES, MAX_BODY_LINES = 3, 25
MAX_PROMPT_CHARS = 4000  # the prompt keeps the file's last 4000 characters before the body, from a line start
DEFAULT_PROBLEMS = 60


def package_root(package: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError, TypeError):  # a parent package that is missing, a relative or empty name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"repository dataset: package {package!r} is not installed (pip install {package})")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _tail(text: str) -> str:
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    cut = text.find("\n", len(text) - MAX_PROMPT_CHARS)
    return text[cut + 1 :]


def _stops(indent: int) -> tuple[str, ...]:
    heads = ("def ", "async def ", "class ", "@")
    return tuple(f"\n{' ' * i}{h}" for i in range(0, indent + 1, 4) for h in heads)


def _candidates(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        scopes = [(node, "") for node in tree.body]
        while scopes:
            node, prefix = scopes.pop(0)
            if isinstance(node, ast.ClassDef):
                scopes += [(child, f"{prefix}{node.name}.") for child in node.body]
                continue
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if ast.get_docstring(node) is not None:
                body = body[1:]
            if not body:
                continue
            start, end = body[0].lineno, node.end_lineno or body[-1].lineno
            if not MIN_BODY_LINES <= end - start + 1 <= MAX_BODY_LINES:
                continue
            found.append(
                {
                    "file": str(path.relative_to(root)),
                    "name": f"{prefix}{node.name}",
                    "prompt": _tail("".join(lines[: start - 1])),
                    "reference": "".join(lines[start - 1 : end]),
                    "indent": node.col_offset,
                }
            )
    return found


def load_repository_problems(package: str, n: int = DEFAULT_PROBLEMS) -> list[Problem]:
    root = package_root(package)
    candidates = _candidates(root)
    if len(candidates) < n:
        raise UserError(f"package {package!r} has only {len(candidates)} functions of a suitable size, need {n}")
    step = len(candidates) / n
    chosen = [candidates[int(i * step)] for i in range(n)]
    return [
        Problem(
            dataset=f"repo:{package}",
            task_id=f"{package}/{c['file']}:{c['name']}",
            user_message="",
            response_prefix="",
            code_prefix="",
            raw_prompt=c["prompt"],
            stop=_stops(c["indent"]),
            reference=c["reference"],
            # the repository store names it from the package root, a general store by its whole path
            exclude_files=(c["file"], f"{package.replace('.', '/')}/{c['file']}"),
        )
        for c in chosen
    ]


def similarity(completion: str, reference: str) -> dict:
    """exact_match and edit_similarity (difflib ratio) of a body against the original, whitespace-trimmed."""
    a, b = completion.strip(), reference.strip()
    return {"exact_match": a == b, "edit_similarity": round(difflib.SequenceMatcher(None, a, b).ratio(), 4)}
