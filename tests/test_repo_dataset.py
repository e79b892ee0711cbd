"""The repository-level set: problems from an installed package, scored by similarity, answer excluded."""

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.repo_dataset import MAX_PROMPT_CHARS, similarity


def test_problems_from_an_installed_package():
    problems = load_problems("repo:rich")
    assert len(problems) == 60 and len({p.task_id for p in problems}) == 60
    assert load_problems("repo:rich") == problems  # deterministic
    for p in problems:
        assert p.raw_prompt and p.reference and not p.test_program
        assert len(p.raw_prompt) <= MAX_PROMPT_CHARS
        own = p.task_id.split("/", 1)[1].split(":")[0]
        assert p.exclude_files == (own, f"rich/{own}")  # as the repository store and a general store name it
        name = p.task_id.rsplit(":", 1)[1].split(".")[-1]
        assert f"def {name}(" in p.raw_prompt  # the prompt ends with the function's own signature
        assert 3 <= len(p.reference.strip("\n").splitlines()) <= 25
        assert all(stop.startswith("\n") for stop in p.stop)
    assert len({p.exclude_files for p in problems}) >= 10  # spread over the project


def test_similarity_scores():
    assert similarity("  return x\n", "return x") == {"exact_match": True, "edit_similarity": 1.0}
    s = similarity("return y", "return x")
    assert not s["exact_match"] and 0.8 < s["edit_similarity"] < 1.0


def test_unknown_package_is_a_clear_error():
    import pytest

    from codeaccel.errors import CodeaccelError

    with pytest.raises(CodeaccelError, match="not installed"):
        load_problems("repo:no_such_package_xyz")
