"""Edit sets from git history: which commits and functions become problems, the problems, the packaged set."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.edit_dataset import (
    SKIP_SUBJECT,
    build_edit_set,
    data_path,
    problems_from_records,
    read_records,
    scan_history,
    similarity_scores,
    spread,
)
from codeaccel.errors import UserError

V1 = '''\
"""A tiny module."""


def alpha(values):
    total = 0
    for v in values:
        total += v
    return total


class Box:
    def __init__(self, items):
        self.items = list(items)

    def size(self):
        count = 0
        for _ in self.items:
            count += 1
        return count


def beta(x):
    y = x * 2
    z = y + 1
    return z
'''

SIZE_OLD = """\
    def size(self):
        count = 0
        for _ in self.items:
            count += 1
        return count
"""
SIZE_NEW = """\
    def size(self):
        count = 0
        for item in self.items:
            if item:
                count += 1
        return count
"""
ALPHA_SPACED = """\
def alpha(values):
    total = 0

    for v in values:
        total +=  v
    return total
"""
ALPHA_NEW = """\
def alpha(values):
    total = 0

    for v in values:
        if v is not None:
            total += v
    return total
"""
_CLOCK = itertools.count()
ALPHA_V1 = "def alpha(values):\n    total = 0\n    for v in values:\n        total += v\n    return total\n"


def _git(repo, *args):
    stamp = f"2024-01-01T00:{next(_CLOCK):02d}:00"  # each call a minute later: the history's order is fixed
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_AUTHOR_DATE": stamp,
        "GIT_COMMITTER_DATE": stamp,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=env, check=True, capture_output=True)


def _commit(repo, message, files):
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A history with two real edits among a whitespace-only change, renames and a version bump."""
    root = tmp_path_factory.mktemp("history")
    _git(root, "init", "-q", "-b", "main")
    extra = "def helper(a):\n    b = a + 1\n    c = b * 2\n    return c\n"
    _commit(root, "Initial commit", {"pkg/mod.py": V1, "pkg/sub/extra.py": extra})
    v2 = V1.replace(SIZE_OLD, SIZE_NEW)
    _commit(root, "Count only truthy items in Box.size\n\nEmpty items are not counted any more.", {"pkg/mod.py": v2})
    v3 = v2.replace(ALPHA_V1, ALPHA_SPACED)
    _commit(root, "Tidy up alpha", {"pkg/mod.py": v3})  # whitespace only
    v4 = v3.replace("def beta(x):", "def gamma(x):")
    _commit(root, "Rename beta to gamma", {"pkg/mod.py": v4})  # a function renamed: in one version only
    _git(root, "mv", "pkg/mod.py", "pkg/core.py")
    _commit(root, "Move mod.py to core.py", {})  # a file renamed
    v6 = v4.replace("z = y + 1", "z = y + 2")
    _commit(root, "Bump version to 1.1", {"pkg/core.py": v6})  # a real edit, but a release commit
    v7 = v6.replace(ALPHA_SPACED, ALPHA_NEW).replace(
        "self.items = list(items)", "self.items = [i for i in items if i is not None]"
    )
    message = "Skip None values\n\nalpha and Box ignore None.\n\nCo-authored-by: x <x@example.com>"
    _commit(root, message, {"pkg/core.py": v7})  # two functions edited: the first one is taken
    _commit(root, "Improve the extra helper", {"pkg/sub/extra.py": extra.replace("a + 1", "a + 3")})  # not in glob
    return root


def test_the_builder_finds_exactly_the_real_edits(repo):
    scan = scan_history(repo, "pkg/*.py", "tiny")
    found = [(c["path"], c["qualname"], c["subject"]) for c in scan.candidates]
    assert found == [
        ("pkg/mod.py", "Box.size", "Count only truthy items in Box.size"),
        ("pkg/core.py", "alpha", "Skip None values"),
    ]
    assert scan.commits == 6  # every non-merge commit after the first that touches pkg/*.py
    assert {"formatting only", "no modified file (added, deleted or renamed)"} <= set(scan.skipped)
    assert scan.skipped["subject: merge, release, version or formatting"] == 1
    size, alpha = scan.candidates
    assert size["old_function"] == SIZE_OLD and size["new_function"] == SIZE_NEW and size["indent"] == 4
    assert size["task_id"].startswith("tiny/") and size["task_id"].endswith(":Box.size")
    assert size["message"] == "Count only truthy items in Box.size\n\nEmpty items are not counted any more."
    assert alpha["old_function"] == ALPHA_SPACED and alpha["new_function"] == ALPHA_NEW and alpha["indent"] == 0
    assert "Co-authored-by" not in alpha["message"] and alpha["message"].startswith("Skip None values\n\n")
    for c in scan.candidates:
        assert c["old_function"] in c["file_before"] and len(c["commit"]) == 40
    assert build_edit_set(repo, "pkg/*.py", n=1, name="tiny")[1] == [size]
    assert build_edit_set(repo / ".git", ["pkg/*.py"], n=5, name="tiny")[1] == scan.candidates  # fewer: all of them


def test_limits_leave_out_long_files_and_prompts_that_do_not_fit(repo):
    assert scan_history(repo, "pkg/*.py", max_file_chars=100).candidates == []
    assert scan_history(repo, "pkg/*.py", n_ctx=300).candidates == []  # prompt + answer + overhead > 300 tokens


def test_problems_show_the_file_and_message_and_expect_the_new_function(repo):
    records = scan_history(repo, "pkg/*.py", "tiny").candidates
    size, alpha = problems_from_records(records, "tiny")
    assert size.dataset == "edits:tiny" and size.task_id == records[0]["task_id"]
    assert size.prediction == textwrap.dedent(SIZE_OLD) and size.reference == textwrap.dedent(SIZE_NEW)
    assert size.response_prefix == "```python\n" and size.code_prefix == "" and size.stop == ("\n```",)
    assert not size.tests and size.raw_prompt is None
    assert f"```python\n{records[0]['file_before']}```" in size.user_message
    assert "Empty items are not counted any more." in size.user_message and "`Box.size`" in size.user_message
    assert alpha.prediction == ALPHA_SPACED and alpha.reference == ALPHA_NEW


def test_completions_are_scored_dedented(repo):
    [problem] = problems_from_records(scan_history(repo, "pkg/*.py", "tiny").candidates[:1], "tiny")
    assert similarity_scores(problem, SIZE_NEW) == {"exact_match": True, "edit_similarity": 1.0}  # as indented
    assert similarity_scores(problem, textwrap.dedent(SIZE_NEW) + "\n") == {"exact_match": True, "edit_similarity": 1.0}
    old = similarity_scores(problem, SIZE_OLD)
    assert not old["exact_match"] and 0.5 < old["edit_similarity"] < 1.0


@pytest.mark.parametrize(
    "subject,skip",
    [
        ("Merge branch 'stable'", True),
        ("Release version 8.1.0", True),
        ("bump version", True),
        ("apply black", True),
        ("Fix typo in a docstring", True),
        ("run pre-commit", True),
        ("isort imports", True),
        ('Revert "Merge Stable into master"', True),
        ("Add support of pathlib.Path to edit", False),
        ("Fix version_option for packages", False),
    ],
)
def test_release_merge_and_formatting_subjects_are_skipped(subject, skip):
    assert bool(SKIP_SUBJECT.search(subject)) is skip


def test_spread_is_even_and_deterministic():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread([1, 2], 5) == [1, 2]


def test_bad_input_is_a_user_error(tmp_path, repo):
    with pytest.raises(UserError, match="not a git repository"):
        scan_history(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a git repository"):
        scan_history(tmp_path)
    with pytest.raises(UserError, match="no edit candidates"):
        build_edit_set(repo, "nothing/*.py")
    with pytest.raises(UserError, match="unknown edit set 'nosuch': choose from edits:click"):
        load_problems("edits:nosuch")
    with pytest.raises(UserError, match="unknown edit set"):
        load_problems("edits:")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "codeaccel", *args], capture_output=True, text=True, timeout=300)


def test_the_command_builds_a_set_and_gives_one_line_errors(tmp_path, repo):
    out = tmp_path / "edits-tiny.jsonl.gz"
    done = _cli(
        "dataset", "build-edits", "--git-dir", str(repo), "--glob", "pkg/*.py", "--name", "tiny", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "6 commits scanned, 2 candidates, 2 chosen" in done.stdout
    assert [r["qualname"] for r in read_records(out)] == ["Box.size", "alpha"]
    for args, message in [
        (["--git-dir", str(tmp_path / "nowhere"), "--out", str(out)], "not a git repository"),
        (["--git-dir", str(repo), "--glob", "nothing/*.py", "--out", str(out)], "no edit candidates"),
        (["--git-dir", str(repo), "--glob", "pkg/*.py", "--out", str(out), "--n", "0"], "must be >= 1"),
        (["--git-dir", str(repo), "--glob", "pkg/*.py", "--n", "2", "--out", "/proc/no/e.jsonl.gz"], "cannot write"),
    ]:
        bad = _cli("dataset", "build-edits", *args)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_the_packaged_click_set():
    problems = load_problems("edits:click")
    assert len(problems) == 40 and len({p.task_id for p in problems}) == 40
    assert load_problems("edits:click", limit=3) == problems[:3]
    records = read_records(data_path("click"))
    for r, p in zip(records, problems, strict=True):
        assert r["old_function"] in r["file_before"] and r["old_function"] != r["new_function"]
        assert p.prediction == textwrap.dedent(r["old_function"]) and p.reference == textwrap.dedent(r["new_function"])
        assert p.task_id.startswith("click/") and p.user_message.endswith("with no explanation.")
