"""A benchmark problem as the cascade needs it: the answer prompt, the function under test, a reference.

The answer prompt is the benchmark's own (:mod:`codeaccel.bench.datasets`: the chat
template, the reply started with a code fence and, for HumanEval, the signature), so a
cascade's pass@1 compares with every other row of the harness. The self-tests need the
function's name (``entry_point``: HumanEval's field; MBPP's is the function its first
official test calls), the signature and docstring the tests are written against, and
the dataset's reference solution (to measure how many generated test lines are valid).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from importlib import resources

from codeaccel.bench.datasets import FENCE, humaneval_rows, load_problems
from codeaccel.bench.problem import Problem
from codeaccel.errors import UserError

DATASETS = ("humaneval", "mbpp")
_CALL = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\(")


@dataclass(frozen=True)
class CascadeProblem:
    problem: Problem  # the harness's problem: answer prompt, stop strings, official tests
    entry_point: str  # the function the self-tests call
    spec: str  # what the tests are written against: signature + docstring (HumanEval) or the task text (MBPP)
    reference: str  # the dataset's reference solution, a complete program
    #: official test lines the answer prompt shows (MBPP's asserts; HumanEval's tests are hidden): a self-test
    #: repeating one is the grader's own test, so replays leave such lines out (``self_tests.repeats_shown_test``)
    shown_tests: tuple[str, ...] = ()

    @property
    def task_id(self) -> str:
        return self.problem.task_id

    @property
    def dataset(self) -> str:
        return self.problem.dataset

    @property
    def spec_is_code(self) -> bool:
        """The spec is the function's signature and docstring (HumanEval, a user's function), not a task text."""
        return self.dataset != "mbpp"


def check_dataset(dataset: str) -> str:
    """The dataset's key, or a UserError naming the ones the cascade runs on."""
    key = dataset.strip().lower()
    if key not in DATASETS:
        raise UserError(f"the cascade runs on {', '.join(DATASETS)}, not {dataset!r}")
    return key


def load_cascade_problems(dataset: str, limit: int | None = None) -> list[CascadeProblem]:
    key = check_dataset(dataset)
    problems = load_problems(key, limit)
    if key == "humaneval":
        rows = {r["task_id"]: r for r in humaneval_rows()}
        return [
            CascadeProblem(
                problem=p,
                entry_point=rows[p.task_id]["entry_point"],
                spec=rows[p.task_id]["prompt"],
                reference=rows[p.task_id]["prompt"] + rows[p.task_id]["canonical_solution"],
            )
            for p in problems
        ]
    path = resources.files("codeaccel") / "data" / "mbpp" / "sanitized-mbpp.json"
    rows = {f"Mbpp/{r['task_id']}": r for r in json.loads(path.read_text())}
    out = []
    for p in problems:
        r = rows[p.task_id]
        entry = mbpp_entry_point(r["test_list"], r["code"])
        imports = "\n".join(r["test_imports"])
        out.append(
            CascadeProblem(
                problem=p,
                entry_point=entry,
                spec=r["prompt"],
                reference=f"{imports}\n{r['code']}" if imports else r["code"],
                shown_tests=tuple(r["test_list"]),
            )
        )
    return out


def function_problem(spec: str, name: str = "function") -> CascadeProblem:
    """A user's function to complete, given as HumanEval gives one: imports, the signature and a docstring.

    The entry point the self-tests call is the last function the text defines; there are no
    official tests and no reference (nothing to score against: the cascade's own tests decide)."""
    try:
        tree = ast.parse(spec)
    except SyntaxError as exc:
        why = f"{exc.msg}, line {exc.lineno}"
        raise UserError(f"{name}: not Python ({why}): give the function's signature and docstring") from None
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    if not defined:
        raise UserError(f"{name}: defines no function: give the signature and docstring of the one to write")
    prompt = spec.rstrip("\n") + "\n"
    problem = Problem(
        dataset="function",
        task_id=name,
        user_message=f"Complete the following Python function.\n{FENCE}{prompt}```",
        response_prefix=FENCE + prompt,
        code_prefix=prompt,
    )
    return CascadeProblem(problem=problem, entry_point=defined[-1], spec=prompt, reference="")


def mbpp_entry_point(test_list: list[str], code: str) -> str:
    """The function MBPP's tests call: the first name called after ``assert`` that the reference defines."""
    defined = set(re.findall(r"^def\s+([A-Za-z_][A-Za-z0-9_]*)", code, flags=re.M))
    for test in test_list:
        for name in _CALL.findall(test):
            if name in defined:
                return name
    if len(defined) == 1:
        return next(iter(defined))
    raise UserError(f"cannot tell which function MBPP's tests call: {test_list[:1]}")
