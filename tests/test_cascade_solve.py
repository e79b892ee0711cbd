"""A cascade configuration answering one problem live: what each stage generates, decides and returns."""

import json

import pytest

from codeaccel.cascade import solve as solve_module
from codeaccel.cascade.config import Stage, generations, make_config
from codeaccel.cascade.generation import GenerationSettings, generate_problems
from codeaccel.cascade.problems import function_problem, load_cascade_problems
from codeaccel.cascade.solve import CascadeSolver, choose_tuned, parse_stages
from codeaccel.engines import load_engine, open_sequences
from codeaccel.errors import UserError

SPEC = 'import math\n\ndef helper(x):\n    return x\n\ndef area(r: float) -> float:\n    """Circle area."""\n'


def test_a_users_function_is_a_problem_for_its_last_function():
    cp = function_problem(SPEC, "area.py")
    assert cp.entry_point == "area" and cp.spec_is_code and cp.problem.tests == ()
    assert cp.problem.response_prefix.endswith('"""Circle area."""\n') and cp.task_id == "area.py"
    with pytest.raises(UserError, match="not Python"):
        function_problem("def broken(:\n", "x.py")
    with pytest.raises(UserError, match="defines no function"):
        function_problem("x = 1\n", "x.py")


def test_stages_are_parsed_and_checked():
    config = parse_stages("a:3:2, b:10:4", "0.6")
    assert [(s.model, s.k, s.l) for s in config.stages] == [("a", 3, 2), ("b", 10, 4)]
    assert config.thetas == (0.6, 0.0)
    assert parse_stages("C:\\models\\x.gguf:1:2,b:0:0", "0.2,0.4").stages[0].model == "C:\\models\\x.gguf"
    itself = parse_stages("1.5b:3:2,qwen2.5-coder-1.5b-instruct:10:2", "0.5")  # an alias, then the name
    assert {s.model for s in itself.stages} == {"qwen2.5-coder-1.5b-instruct"}
    assert itself.earlier_of_same_model(1) == (itself.stages[0],)
    for spec, theta, message in [("a:3", "0.5", "MODEL:K:L"), ("a:x:2", "0.5", "integers"),
                                 ("a:3:2", "half", "--theta"), ("a:2:2", "0.5", "k must be one of")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            parse_stages(spec, theta)


def _report(tmp_path):
    def row(split, label, pass_at_1, cost, stages, thetas):
        return {"split": split, "scorer": "cascade", "pass_at_1": pass_at_1, "cost_usd": cost,
                "config": {"label": label, "stages": stages, "thetas": thetas}}  # fmt: skip

    cheap = ([{"model": "a", "k": 0, "l": 0}], [0.0])
    mid = ([{"model": "a", "k": 1, "l": 2}, {"model": "b", "k": 0, "l": 0}], [0.5, 0.0])
    top = ([{"model": "b", "k": 10, "l": 2}], [0.0])
    rows = [row("tune", "cheap", 0.5, 0.001, *cheap), row("tune", "mid", 0.7, 0.002, *mid),
            row("validate", "cheap", 0.55, 0.0011, *cheap), row("validate", "mid", 0.72, 0.0019, *mid),
            row("validate", "top", 0.9, 0.005, *top)]  # fmt: skip  # top was not chosen on the tuning split
    path = tmp_path / "cascade-humaneval-cascade.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_a_tuned_report_gives_the_most_accurate_chosen_point_within_the_budget(tmp_path):
    path = _report(tmp_path)
    point = choose_tuned(path, None)
    config, row = point.config, point.row
    assert row["config"]["label"] == "mid" and config.stages[1] == Stage("b", 0, 0) and config.thetas[0] == 0.5
    assert (point.test_format, point.max_tokens, point.engine) == ("chat", 512, "llama.cpp")  # an older report
    # the tuning split's costs decide (mid costs 0.002 there, 0.0019 on validation): as the tuner chose
    assert choose_tuned(path, 0.0019).row["config"]["label"] == "cheap"
    assert choose_tuned(path, 0.002).row["config"]["label"] == "mid"
    doc = json.loads(path.read_text())
    doc["generation"] = {"test_format": "completion", "max_tokens": 256, "engine": "hf"}
    (tmp_path / "new.json").write_text(json.dumps(doc))
    point = choose_tuned(tmp_path / "new.json", None)
    assert (point.test_format, point.max_tokens, point.engine) == ("completion", 256, "hf")  # as the sweep asked
    doc["generation"]["test_format"] = "xml"
    (tmp_path / "new.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="not a `cascade tune` JSON report"):
        choose_tuned(tmp_path / "new.json", None)
    with pytest.raises(UserError, match="no chosen point costs that little"):
        choose_tuned(path, 0.0001)
    with pytest.raises(UserError, match="no such report"):
        choose_tuned(tmp_path / "missing.json", None)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a `cascade tune` JSON report"):
        choose_tuned(tmp_path / "bad.json", None)


@pytest.mark.parametrize("field,value", [("cost_usd", None), ("cost_usd", "cheap"), ("pass_at_1", None)])
def test_a_report_whose_points_lack_a_number_is_refused_in_one_line(tmp_path, field, value):
    doc = json.loads(_report(tmp_path).read_text())
    for r in doc["rows"]:
        r[field] = value
    (tmp_path / "odd.json").write_text(json.dumps(doc))
    for budget in (None, 0.01):
        with pytest.raises(UserError, match="not a `cascade tune` JSON report"):
            choose_tuned(tmp_path / "odd.json", budget)
    (tmp_path / "odd.json").write_text(json.dumps({"rows": [r for r in doc["rows"] if r["split"] == "tune"]}))
    with pytest.raises(UserError, match="no chosen point validated"):  # not "--budget None: ... costs that little"
        choose_tuned(tmp_path / "odd.json", None)


def test_solve_with_a_tuned_report_scores_as_the_report_was_tuned(tmp_path, tiny_gguf, tiny_gguf_draft, monkeypatch):
    """A dual-agreement report's θ means nothing to the cascade scorer: the report's scorer answers, and a
    --scorer or --theta against the report's point is refused."""
    from typer.testing import CliRunner

    from codeaccel.cascade.solve import Solution
    from codeaccel.cli import app
    from codeaccel.cli import cascade as cli_cascade

    doc = json.loads(_report(tmp_path).read_text())
    doc["generation"] = {"test_format": "completion", "max_tokens": 64, "engine": "llama.cpp"}
    doc["models"] = {"a": tiny_gguf, "b": tiny_gguf_draft}  # what loads each stored name (a sweep of GGUF files)
    for r in doc["rows"]:
        r["scorer"] = "dual-agreement"
    (tmp_path / "da.json").write_text(json.dumps(doc))
    seen = {}

    class Solver:
        def __init__(self, config, *, engine, scorer, **settings):
            seen.update(config=config, scorer=scorer, engine=engine, **settings)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def solve(self, cp, progress=None):
            return Solution(cp.task_id, "pass\n", "pass\n", 0, (), 0.0, None)

    monkeypatch.setattr(cli_cascade, "CascadeSolver", Solver)
    runner = CliRunner()
    base = ["cascade", "solve", "--task", "HumanEval/0", "--tuned", str(tmp_path / "da.json")]
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert seen["scorer"] == "dual-agreement" and seen["config"].thetas[0] == 0.5
    assert [st.model for st in seen["config"].stages] == [tiny_gguf, tiny_gguf_draft]  # loadable, not "a", "b"
    assert (seen["test_format"], seen["max_tokens"], seen["engine"]) == ("completion", 64, "llama.cpp")
    for extra, message in [(["--scorer", "cascade"], "--scorer"), (["--theta", "0.9"], "--theta")]:
        result = runner.invoke(app, base + extra)
        assert isinstance(result.exception, UserError) and message in str(result.exception)


@pytest.fixture(scope="module")
def humaneval_0():
    return load_cascade_problems("humaneval", 1)[0]


def test_a_k0_stage_answers_with_the_sweeps_greedy_answer(tiny_gguf, humaneval_0):
    settings = GenerationSettings(n_samples=0, max_tokens=16, test_format="chat", n_seq_max=4)
    engine = load_engine(tiny_gguf, "llama.cpp", n_ctx=4096)
    rows = []
    try:
        with open_sequences(engine, n_seq_max=4, n_ctx=4096) as seqs:
            generate_problems(engine, seqs, [humaneval_0], settings, lambda _, got: rows.extend(got))
    finally:
        engine.close()
    greedy = next(r for r in rows if r.kind == "answer" and r.sample == -1)
    with CascadeSolver(make_config([Stage(tiny_gguf, 0, 0)], 0.0), max_tokens=16) as solver:
        solution = solver.solve(humaneval_0)
    assert solution.completion == greedy.text and solution.code.startswith(humaneval_0.problem.code_prefix)
    assert [o.decided for o in solution.stages] == ["k=0"] and solution.answered_by == 0
    assert solution.official_passed is False  # the tiny model's text is no solution: HumanEval's tests say so
    assert solution.to_record()["stages"][0]["generated_tokens"] == greedy.tokens


def test_a_model_following_itself_generates_only_what_it_adds(tiny_gguf, humaneval_0, monkeypatch):
    asked = []

    def spy(*args, only=None, **kwargs):
        asked.append(only)
        return generate_problems(*args, only=only, **kwargs)

    monkeypatch.setattr(solve_module, "generate_problems", spy)
    first, second = Stage(tiny_gguf, 3, 2), Stage(tiny_gguf, 5, 2)
    # θ = 1: only answers that pass every test line all agree; the tiny model's do not, so it escalates
    with CascadeSolver(make_config([first, second], 1.0), max_tokens=12) as solver:
        solution = solver.solve(humaneval_0)
    assert [o.decided for o in solution.stages] == ["escalated", "last"] and solution.answered_by == 1
    assert asked == [generations(first), generations(second) - generations(first)]
    assert len(asked[1]) == 4  # samples 3 and 4: an answer and a test each
    assert solution.stages[1].n_answers == 5  # yet the second stage chooses among all five
    assert solution.official_passed is False


def test_a_stage_whose_tests_vouch_for_one_sample_answers_with_that_sample(tiny_gguf, humaneval_0, monkeypatch):
    """The live solver takes the scorer's best answer, not the first: sample 2 alone passes both test lines,
    its score 2 · 1 reaches θ · k · N_t = 0.3 · 3 · 2, the stage accepts it and the later stage never runs."""
    seen = {}

    def two_lines(text, entry_point, n_lines):
        return ["assert candidate(1) == 1", "assert candidate(2) == 2"]

    def only_sample_2_passes(self, cp, model, samples, answers, lines, line_passed):
        seen["answers"] = [a.text for a in answers]
        for s in samples:
            line_passed[(model, s)] = {line: s == 2 for line in lines}

    monkeypatch.setattr(solve_module, "extract_test_lines", two_lines)
    monkeypatch.setattr(CascadeSolver, "_execute", only_sample_2_passes)
    config = make_config([Stage(tiny_gguf, 3, 2), Stage(tiny_gguf + "-never-loaded", 0, 0)], [0.3, 0.0])
    with CascadeSolver(config, max_tokens=12) as solver:
        solution = solver.solve(humaneval_0)
    (stage,) = solution.stages
    assert stage.decided == "accepted" and solution.answered_by == 0 and stage.verdict.best == 2
    assert solution.completion == seen["answers"][2]


def test_a_function_on_stdin_that_is_not_utf8_is_one_line_exit_2():
    import subprocess
    import sys

    args = ["cascade", "solve", "-", "--stages", "qwen2.5-coder-0.5b-instruct:0:0"]
    result = subprocess.run([sys.executable, "-m", "codeaccel", *args], input=b"def f():\n    '\xff'\n",
                            capture_output=True, timeout=300)  # fmt: skip
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "not UTF-8" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_problem_interrupted_mid_generation_leaves_no_sequence_open_for_the_next(tiny_gguf, humaneval_0):
    """Ctrl-C (or any error) while a stage decodes: its sequences are closed, so the solver's next problem
    starts on an empty sequence set, not beside the interrupted one's cache."""
    with CascadeSolver(make_config([Stage(tiny_gguf, 0, 0)], 0.0), max_tokens=16) as solver:
        _, seqs = solver._model(tiny_gguf)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        seqs.eval = interrupted  # the first evaluation: the prompt's, after its sequence was opened
        with pytest.raises(KeyboardInterrupt):
            solver.solve(humaneval_0)
        del seqs.eval
        assert seqs.open_sequences == []
        assert [o.decided for o in solver.solve(humaneval_0).stages] == ["k=0"]
        assert seqs.open_sequences == []


def test_close_frees_everything_even_where_freeing_one_model_fails():
    """A model whose sequences fail to free still has its engine closed, and so have the other models
    and the sandbox pool; the failure is raised after."""
    closed: list[str] = []

    class Seqs:
        def __init__(self, name, fails):
            self.name, self.fails = name, fails

        def free(self):
            closed.append(f"{self.name} seqs")
            if self.fails:
                raise RuntimeError("free failed")

    class Engine:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(f"{self.name} engine")

    solver = CascadeSolver(make_config([Stage("a", 1, 2), Stage("b", 0, 0)], 0.5))
    solver._models = {"a": (Engine("a"), Seqs("a", True)), "b": (Engine("b"), Seqs("b", False))}
    pool_close = solver._pool.close
    solver._pool.close = lambda: (closed.append("pool"), pool_close())
    with pytest.raises(RuntimeError, match="free failed"):
        solver.close()
    assert sorted(closed) == ["a engine", "a seqs", "b engine", "b seqs", "pool"]
    assert closed[-1] == "pool" and solver._models == {}
