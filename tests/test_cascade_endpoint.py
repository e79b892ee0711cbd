"""An OpenAI-compatible chat endpoint as a cascade stage: named, asked, stored, priced, refused when unreachable."""

from __future__ import annotations

import pytest

from codeaccel.cascade.endpoint import Endpoint, answer_completion, first_code_block, parse_endpoint, stage_name
from codeaccel.cascade.problems import load_cascade_problems
from codeaccel.cascade.self_tests import extract_test_lines
from codeaccel.cascade.store import GenerationStore
from codeaccel.errors import UserError


def test_an_endpoint_is_named_by_scheme_model_and_url():
    assert parse_endpoint("openai:gpt-4o-mini@https://api.example.com/v1/") == Endpoint(
        "gpt-4o-mini", "https://api.example.com/v1"
    )
    assert parse_endpoint("openai:org/model@name@http://127.0.0.1:8080/v1").model == "org/model@name"
    assert stage_name("openai:m@http://h:1/v1") == "openai:m"  # the store keeps the model, not the URL
    assert parse_endpoint("qwen2.5-coder-0.5b-instruct") is None
    for bad in ("openai:m", "openai:@http://h/v1", "openai:m@ftp://h/v1", "openai:m@h:8080"):
        with pytest.raises(UserError, match="openai:MODEL@"):
            parse_endpoint(bad)


def _passes(cp, completion: str) -> bool:
    namespace: dict = {}
    try:
        exec(cp.problem.solution(completion) + "\n" + "\n".join(cp.problem.tests), namespace)  # noqa: S102
    except Exception:  # noqa: BLE001 (a wrong answer, or code that does not even run)
        return False
    return True


def test_a_chat_reply_becomes_the_completion_of_the_started_code():
    cp = load_cascade_problems("humaneval", 1)[0]
    reference_body = cp.reference[len(cp.spec) :]
    repeated = f"Here you go:\n```python\n{cp.spec}{reference_body}\n```\nIt loops over pairs."
    assert answer_completion(cp, repeated).strip() == reference_body.strip()  # the started code repeated: the rest
    rewritten = (
        "```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1 :])\n```"
    )
    completion = answer_completion(cp, rewritten)
    assert _passes(cp, completion)  # its definition replaces the started one
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1 :])"
    assert _passes(cp, answer_completion(cp, f"```python\n{body}\n```"))  # an indented reply: the body
    assert not _passes(cp, answer_completion(cp, "```python\ndef has_close_elements(n, t):\n    return True\n```"))
    mbpp = load_cascade_problems("mbpp", 1)[0]
    assert answer_completion(mbpp, "```python\ndef f():\n    return 1\n```") == "def f():\n    return 1"
    with_import = next(p for p in load_cascade_problems("mbpp") if p.problem.code_prefix.strip())  # import math
    reply = f"Here:\n```python\n{with_import.reference}\n```"
    assert _passes(with_import, answer_completion(with_import, reply))


def test_test_replies_are_read_from_their_first_code_block():
    reply = "Sure:\n```python\nassert f(1) == 2\nassert f(2) == 3\n```\nand `assert f(0) == 9` too."
    assert first_code_block(reply) == "assert f(1) == 2\nassert f(2) == 3"
    assert first_code_block("Sure:\r\n``` python\r\nassert f(1) == 2\r\n```\r\nok") == "assert f(1) == 2"
    stored = f"```python\n{first_code_block(reply)}\n```"
    assert extract_test_lines(stored, "f", 4) == ["assert f(1) == 2", "assert f(2) == 3"]
    assert first_code_block("assert f(1) == 2") == "assert f(1) == 2"  # no fence: the whole reply


@pytest.fixture(scope="module")
def endpoint_server(tiny_gguf, tmp_path_factory):
    from codeaccel.serve.settings import ServeSettings
    from live_server import LiveServer

    events = tmp_path_factory.mktemp("endpoint") / "events.sqlite"
    settings = ServeSettings(model=tiny_gguf, model_alias="tiny-endpoint", method="autoregressive", parallel=4,
                             ctx_size=4096, events_db=events, completion_cache=0)  # fmt: skip
    with LiveServer(settings) as live:
        yield live


def test_an_endpoint_stage_is_generated_priced_executed_and_resumed(endpoint_server, tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from codeaccel.cli import app

    stage = f"openai:tiny-endpoint@{endpoint_server.url}/v1"
    args = ["cascade", "run", "humaneval", "--models", f"{tiny_gguf},{stage}", "--limit", "2", "--max-tokens", "8",
            "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with GenerationStore(tmp_path / "store.sqlite") as store:
        assert store.executed_tasks("openai:tiny-endpoint", "humaneval") == {"HumanEval/0", "HumanEval/1"}
        rows = store.generations("openai:tiny-endpoint", "humaneval", "HumanEval/0")
        assert len(rows) == 1 + 10 + 2 * (1 + 10)
        answers = [r for r in rows if r.kind == "answer"]
        assert all(0 < r.tokens <= 8 and r.prompt_tokens > 0 for r in answers)  # the endpoint's own usage counts
        assert {r.temperature for r in answers} == {0.0, 0.8} and all(r.cost_s > 0 for r in rows)
        costs = store.batch_costs("openai:tiny-endpoint")
        assert sorted(costs) == [1, 2, 4, 8]
        steps = [costs[b].s_per_token * b for b in (1, 2, 4, 8)]  # seconds per decode step of b streams
        assert all(0.0002 < step < 5 for step in steps), steps  # a tiny model's step over loopback: not ~0, not huge
        assert costs[1].cpu.startswith(f"endpoint {endpoint_server.url}/v1")
        n_rows = len(rows)
    again = CliRunner().invoke(app, args)  # resumed: nothing asked again
    assert again.exit_code == 0, again.output
    with GenerationStore(tmp_path / "store.sqlite") as store:
        assert len(store.generations("openai:tiny-endpoint", "humaneval", "HumanEval/0")) == n_rows


def test_an_unreachable_endpoint_is_one_line_and_keeps_what_is_stored(tiny_gguf, tmp_path):
    from test_cli import run_cli

    args = ["cascade", "run", "humaneval", "--models", f"{tiny_gguf},openai:m@http://127.0.0.1:9/v1",
            "--limit", "1", "--max-tokens", "8", "--out", str(tmp_path)]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "Traceback" not in result.stderr
    with GenerationStore(tmp_path / "store.sqlite") as store:
        assert store.executed_tasks("tiny", "humaneval") == {"HumanEval/0"}
        assert not store.generated_tasks("openai:m", "humaneval")
    completion_format = run_cli(*args[:-2], "--test-format", "completion", "--out", str(tmp_path / "other"))
    assert completion_format.returncode == 2 and "--test-format chat" in completion_format.stderr


def test_an_endpoint_stage_answers_live_with_only_what_the_stage_reads(endpoint_server, monkeypatch):
    from codeaccel.cascade.config import Stage, make_config
    from codeaccel.cascade.endpoint import EndpointStage
    from codeaccel.cascade.solve import CascadeSolver

    asked = []
    chat = EndpointStage._chat
    monkeypatch.setattr(EndpointStage, "_chat", lambda self, messages, *a, **kw: asked.append(a[2]) or chat(
        self, messages, *a, **kw))  # fmt: skip
    stage = f"openai:tiny-endpoint@{endpoint_server.url}/v1"
    cp = load_cascade_problems("humaneval", 1)[0]
    with CascadeSolver(make_config([Stage(stage, 3, 2)], 0.0), max_tokens=8) as solver:
        solution = solver.solve(cp)
    (outcome,) = solution.stages
    assert solution.answered_by == 0 and outcome.decided == "last" and outcome.n_answers == 3
    assert sorted(asked) == [0, 0, 1, 1, 2, 2]  # seeds: 3 answers and 3 tests (l = 2), nothing else asked
    assert outcome.generated_tokens > 0 and solution.code.startswith(cp.problem.code_prefix)
    with pytest.raises(UserError, match="chat format"):
        CascadeSolver(make_config([Stage(stage, 3, 2)], 0.0), test_format="completion")
    unreachable = make_config([Stage("openai:m@http://127.0.0.1:9/v1", 0, 0)], 0.0)
    with CascadeSolver(unreachable) as solver, pytest.raises(UserError, match="unreachable"):
        solver.solve(cp)
