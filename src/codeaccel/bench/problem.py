"""One benchmark problem: what the model is given, how generation stops, and how the result is scored.

Shared by every dataset (:mod:`codeaccel.bench.datasets` for HumanEval and MBPP,
:mod:`codeaccel.bench.repo_dataset` for the repository-level set) and the harness.
"""

from __future__ import annotations

from dataclasses import dataclass

STOP = ("\n```",)  # the closing code fence: the end of a fenced-prompt completion


@dataclass(frozen=True)
class Problem:
    dataset: str
    task_id: str
    user_message: str
    response_prefix: str  # the assistant's reply as we start it; the model continues from here
    code_prefix: str  # the part of response_prefix that is code
    tests: tuple[str, ...] = ()  # official test lines, run one by one after the solution (() : see reference)
    test_setup: str = ""  # test helpers appended to the solution (HumanEval's ``def check``)
    raw_prompt: str | None = None  # set: the model sees this text as is, without a chat template
    stop: tuple[str, ...] = STOP
    reference: str | None = None  # the original code, for datasets scored by similarity instead of tests
    exclude_files: tuple[str, ...] = ()  # datastore files that hold this problem's answer
    prediction: str | None = None  # an expected output (an edit's original text), a drafting source

    def solution(self, completion: str) -> str:
        """The code the test lines run against: started code + completion (+ test helpers)."""
        return f"{self.code_prefix}{completion}\n\n{self.test_setup}\n"

    @property
    def test_program(self) -> str:
        """The tests as one text (helpers, then lines)."""
        return "\n\n".join(part for part in (self.test_setup, "\n".join(self.tests)) if part)
