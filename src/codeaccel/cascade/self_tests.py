"""Tests a model writes for its own answers: the prompt that asks for them, the lines kept from the reply.

Two prompt formats, measured against each other (``docs/benchmarks/cascade/``):

* ``completion`` (the cascade paper's code, ``BoyuanJackChen/code-cascading``): the raw
  text of the function's signature and docstring with ``pass`` as its body, then
  ``# Assume the above function is completed. Write {l} lines of testing code for the
  function.``, and the reply started as ``assert <entry point>(``; no chat template.
* ``chat``: the model's chat template; the user turn shows the function (HumanEval's
  signature and docstring, MBPP's task text and its shown tests, as the answer prompt
  shows them) and asks for l assert lines; the reply is started as a code fence and
  ``assert <entry point>(``.

:func:`extract_test_lines` keeps, in order, the reply's lines that are one ``assert``
statement calling the entry point and compile on their own (CodeT keeps only such
pieces), each in one canonical spelling (``ast.unparse``), without duplicates in that
spelling, at most l of them.

Where the answer prompt shows official tests (MBPP shows all three it is graded by), a
model's "own" test may be a copy of one: :func:`repeats_shown_test` finds the lines that
call the entry point with the arguments of a shown test, which replays leave out, so
that an answer is chosen by the model's tests and never by the grader's.
"""

from __future__ import annotations

import ast
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from codeaccel.bench.datasets import FENCE
from codeaccel.cascade.problems import CascadeProblem

SelfTestFormat = Literal["completion", "chat"]
TEST_FORMATS: tuple[SelfTestFormat, ...] = ("chat", "completion")
PAPER_INSTRUCTION = "# Assume the above function is completed. Write {l} lines of testing code for the function."
TOKENS_PER_LINE = 40  # max tokens asked per test line (an assert with a list literal fits)


@dataclass(frozen=True)
class SelfTestPrompt:
    messages: list[dict[str, str]] | None  # chat format: rendered with the model's template
    raw: str | None  # completion format: the text as is
    response_prefix: str  # the reply as we start it (part of the prompt, and of the text lines are read from)
    stop: tuple[str, ...]
    max_tokens: int


def self_test_prompt(cp: CascadeProblem, l: int, fmt: SelfTestFormat) -> SelfTestPrompt:  # noqa: E741
    start = f"assert {cp.entry_point}("
    max_tokens = TOKENS_PER_LINE * l + 16
    if fmt == "completion":
        body = cp.spec if cp.spec_is_code else f'def {cp.entry_point}(*args):\n    """{cp.spec}"""\n'
        raw = f"{body.rstrip()}\n    pass\n\n\n{PAPER_INSTRUCTION.format(l=l)}\n{start}"
        return SelfTestPrompt(None, raw, start, ("\n\n", "\ndef ", "\nclass ", "\nif __name__", "\n```"), max_tokens)
    if cp.spec_is_code:
        shown = f"{FENCE}{cp.spec.rstrip()}\n```"
    else:
        shown = cp.problem.user_message
    user = (
        f"{shown}\n\nAssume the function `{cp.entry_point}` is completed. Write {l} lines of testing code for it: "
        f"each line one `assert` statement that calls `{cp.entry_point}` and checks its result."
    )
    return SelfTestPrompt([{"role": "user", "content": user}], None, FENCE + start, ("\n```",), max_tokens)


def extract_test_lines(reply: str, entry_point: str, l: int) -> list[str]:  # noqa: E741
    """At most l distinct, compiling, one-line ``assert`` statements that call ``entry_point``, in order, each
    spelt canonically (``assert f(1,2)==3  # x`` → ``assert f(1, 2) == 3``).

    ``reply`` is the text the lines are read from: the started prefix plus the
    completion (a leading code fence is skipped, anything after a closing fence ignored).
    """
    text = reply.split(FENCE, 1)[1] if reply.startswith(FENCE) else reply
    text = text.split("```", 1)[0]
    kept: list[str] = []
    for raw in text.splitlines():
        line = _test_line(raw.strip(), entry_point)
        if line is None or line in kept:
            continue
        kept.append(line)
        if len(kept) == l:
            break
    return kept


def repeats_shown_test(line: str, cp: CascadeProblem) -> bool:
    """The line calls ``cp``'s entry point with the same arguments as an official test the prompt showed."""
    if not cp.shown_tests:
        return False
    return bool(_call_arguments(line, cp.entry_point) & _shown_arguments(cp.shown_tests, cp.entry_point))


SHOWN_TESTS = ("exclude", "keep")  # what a replay does with self-test lines repeating a shown official test


def own_test_filter(problems: Sequence[CascadeProblem]) -> Callable[[str, str], bool]:
    """A replay's ``keep_line(task_id, line)``: the line is no repeat of an official test its prompt showed (a
    task not among ``problems`` shows none)."""
    by_id = {p.task_id: p for p in problems}
    return lambda task_id, line: task_id not in by_id or not repeats_shown_test(line, by_id[task_id])


@functools.cache
def _shown_arguments(tests: tuple[str, ...], entry_point: str) -> frozenset[str]:
    return frozenset().union(*(_call_arguments(t, entry_point) for t in tests))


def _call_arguments(code: str, entry_point: str) -> frozenset[str]:
    """Each call of ``entry_point`` in ``code``, its positional and keyword arguments (these by name) as one
    AST dump. (A call naming an argument that another passes by position is not matched: no signature here.)"""
    try:
        tree = ast.parse(code.strip())
    except (SyntaxError, ValueError):
        return frozenset()
    calls = (n for n in ast.walk(tree) if isinstance(n, ast.Call))
    out = set()
    for c in calls:
        if isinstance(c.func, ast.Name) and c.func.id == entry_point:
            keywords = sorted(c.keywords, key=lambda k: k.arg or "")
            elts = [*c.args, *(k.value for k in keywords)]
            out.add(ast.dump(ast.Tuple(elts=elts, ctx=ast.Load())) + repr([k.arg for k in keywords]))
    return frozenset(out)


def _test_line(line: str, entry_point: str) -> str | None:
    """``line`` in one canonical spelling (``ast.unparse``: spacing, quotes and comments do not make two lines
    distinct) if it is an ``assert`` that compiles alone and calls ``entry_point``; else None."""
    if not line.startswith("assert"):
        return None
    try:
        tree = ast.parse(line)
        with warnings.catch_warnings():  # the model's code, not ours: its SyntaxWarnings are not for the log
            warnings.simplefilter("ignore")
            compile(tree, "<test line>", "exec")  # what parses but cannot run alone (await, yield, return) is no test
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: absurdly nested input
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    calls = (n for n in ast.walk(tree.body[0].test) if isinstance(n, ast.Call))
    if not any(isinstance(c.func, ast.Name) and c.func.id == entry_point for c in calls):
        return None
    try:
        canonical = ast.unparse(tree)
    except (ValueError, RecursionError):
        return None
    return None if "\n" in canonical or "\r" in canonical else canonical  # an f-string spelt over lines
