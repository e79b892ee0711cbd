"""The cascade: scoring and acceptance on hand-made pass matrices, configurations, self-test lines, the store,
replay, the tuner; and an end-to-end run on tiny models through the CLI."""

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codeaccel.cascade.config import Stage, enumerate_configs, generations, make_config
from codeaccel.cascade.cost import generation_seconds, scaled, spent_scale, step_seconds, usd
from codeaccel.cascade.problems import load_cascade_problems, mbpp_entry_point
from codeaccel.cascade.replay import Evaluation, ProblemOutcome, Replay
from codeaccel.cascade.scoring import accept, cascade_scores, decide, dual_agreement_scores
from codeaccel.cascade.self_tests import extract_test_lines, own_test_filter, repeats_shown_test, self_test_prompt
from codeaccel.cascade.store import BatchCost, GenerationStore, Spend, StoredGeneration
from codeaccel.cascade.tuner import TuneResult, pareto_front, split
from codeaccel.errors import InternalError, UserError

# ---- scoring -----------------------------------------------------------------------

# 3 solutions x 4 test lines
M = np.array(
    [
        [1, 1, 0, 0],  # s0 passes t0, t1
        [1, 1, 1, 0],  # s1 passes t0, t1, t2
        [0, 0, 0, 1],  # s2 passes t3 only
    ],
    dtype=bool,
)


def test_cascade_score_is_n_s_times_the_largest_agreement_on_a_passed_line():
    # n_s = [2, 3, 1]; solvers per line = [2, 2, 1, 1]; n_t = [2, 2, 1]
    assert cascade_scores(M).tolist() == [4, 6, 1]


def test_dual_agreement_scores_consensus_sets():
    # every row distinct: each set has 1 member; scores = tests passed
    assert dual_agreement_scores(M).tolist() == [2, 3, 1]
    same = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=bool)
    assert dual_agreement_scores(same).tolist() == [4, 4, 1]  # {s0, s1} x {t0, t2}


def test_accept_threshold_is_theta_k_n_t():
    # best s1 with 6; max = k * N_t = 12
    assert accept(M, 0.5).accepted  # 6 >= 6
    assert not accept(M, 0.6).accepted  # 6 < 7.2
    v = accept(M, 0.5)
    assert (v.best, v.score, v.max_score) == (1, 6, 12)


def test_floating_point_theta_does_not_flip_an_exact_tie():
    passes = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
                       [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)  # fmt: skip
    # score 3 * 1 = 3; theta 0.1 * k 10 * N_t 3 = 3.0000000000000004 in floats
    assert accept(passes, 0.1).accepted


def test_all_agree_gives_the_maximum_score():
    full = np.ones((5, 4), dtype=bool)
    v = accept(full, 1.0)
    assert v.score == v.max_score == 20 and v.accepted


def test_ties_go_to_the_earliest_solution():
    tie = np.array([[0, 1], [1, 0]], dtype=bool)
    assert cascade_scores(tie).tolist() == [1, 1]
    assert accept(tie, 0.0).best == 0
    assert accept(tie, 0.0, "dual-agreement").best == 0


def test_zero_valid_tests_accepts_only_at_theta_zero():
    none = np.zeros((3, 0), dtype=bool)
    assert accept(none, 0.0).accepted and accept(none, 0.0).best == 0
    assert not accept(none, 0.1).accepted


def test_all_failing_solutions_escalate_unless_theta_zero():
    fail = np.zeros((3, 4), dtype=bool)
    assert cascade_scores(fail).tolist() == [0, 0, 0]
    assert not accept(fail, 0.1).accepted
    assert accept(fail, 0.0).accepted


def test_one_greedy_answer_one_test():
    # k = 1: the answer passes 1 of 2 lines; n_t = 1; score 1 of max 2
    one = np.array([[1, 0]], dtype=bool)
    assert accept(one, 0.5).accepted and not accept(one, 0.6).accepted


def test_scorers_can_disagree_on_the_best():
    # s0 passes every line alone; s1..s3 agree on two lines
    passes = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    assert cascade_scores(passes).tolist() == [16, 8, 8, 8]
    assert dual_agreement_scores(passes).tolist() == [4, 6, 6, 6]
    assert accept(passes, 0.0).best == 0 and accept(passes, 0.0, "dual-agreement").best == 1


# ---- configurations ----------------------------------------------------------------


def test_a_stage_answers_at_k0_when_last_or_when_its_verdict_accepts():
    yes, no = accept(M, 0.0), accept(M, 1.0)
    assert yes.accepted and not no.accepted
    assert decide(0, False, None) == "k=0" and decide(0, True, None) == "k=0"
    assert decide(3, True, no) == "last" and decide(3, True, None) == "last"  # the last model's best, unchecked
    assert decide(3, False, yes) == "accepted" and decide(1, False, no) == "escalated"
    with pytest.raises(InternalError):
        decide(3, False, None)


def test_invalid_stages_are_refused_with_the_reason():
    with pytest.raises(UserError, match="k must be one of"):
        make_config([Stage("a", 2, 2)], 0.5)
    with pytest.raises(UserError, match="needs l > 0"):
        make_config([Stage("a", 3, 0)], 0.5)
    with pytest.raises(UserError, match="has l = 0"):
        make_config([Stage("a", 0, 2)], 0.5)
    with pytest.raises(UserError, match="never run"):
        make_config([Stage("a", 0, 0), Stage("b", 1, 2)], 0.5)
    with pytest.raises(UserError, match="every model is skipped"):
        make_config([Stage("a", -1, 0), Stage("b", -1, 0)], 0.5)
    with pytest.raises(UserError, match="θ must be"):
        make_config([Stage("a", 1, 2), Stage("b", 0, 0)], 1.5)


def test_theta_is_kept_only_where_it_decides():
    config = make_config([Stage("a", 3, 2), Stage("b", 1, 4)], 0.7)
    assert config.thetas == (0.7, 0.0)  # the last model is taken without the check
    assert make_config([Stage("a", 3, 2)], 0.7).thetas == (0.0,)


def test_enumeration_counts_two_models():
    configs = list(enumerate_configs(["a", "b"]))
    # per model 10 stages (skip, k=0, 4 k x 2 l); valid pairs 100 - 1 (both skip) - 9 (a k=0, b runs) = 90;
    # of those, a tests and b runs: 8 x 9 = 72, each with 11 θ; the other 18 once
    assert len(configs) == 72 * 11 + 18
    assert len(set(configs)) == len(configs)
    assert sum(c.single_model for c in configs) == 9 + 9
    per_model = list(enumerate_configs(["a", "b", "c"], per_model_theta=True))
    shared = list(enumerate_configs(["a", "b", "c"]))
    assert len(per_model) > len(shared)


def test_a_model_may_follow_itself_when_it_adds_something_and_never_come_back():
    assert generations(Stage("a", 3, 4)) == {("answer", 0, s) for s in range(3)} | {("test", 4, s) for s in range(3)}
    assert generations(Stage("a", 0, 0)) == {("answer", 0, -1)} and generations(Stage("a", -1, 0)) == set()
    make_config([Stage("a", 1, 2), Stage("a", 10, 2)], 0.5)  # greedy first, ten samples on doubt
    make_config([Stage("a", 3, 2), Stage("a", 3, 4)], 0.5)  # the same answers, longer tests
    make_config([Stage("a", 3, 2), Stage("a", 0, 0)], 0.5)  # samples, then the greedy answer
    with pytest.raises(UserError, match="generates nothing new"):
        make_config([Stage("a", 10, 2), Stage("a", 3, 2)], 0.5)
    with pytest.raises(UserError, match="generates nothing new"):
        make_config([Stage("a", 1, 2), Stage("a", 0, 0)], 0.5)  # k=0's greedy answer is the k=1 stage's
    with pytest.raises(UserError, match="comes back after another model"):
        make_config([Stage("a", 1, 2), Stage("b", 1, 2), Stage("a", 3, 2)], 0.5)
    with pytest.raises(UserError, match="comes back"):  # even when the stage between is skipped
        make_config([Stage("a", 1, 2), Stage("b", -1, 0), Stage("a", 3, 2)], 0.5)


def test_enumeration_writes_each_configuration_of_a_repeated_model_once():
    two = list(enumerate_configs(["a", "b"]))
    three = list(enumerate_configs(["a", "b", "b"]))
    assert len(three) > len(two) and len(set(three)) == len(three)
    # a model's single stage is written one way (its skipped stages last): single-model points do not repeat
    assert sum(c.single_model for c in three) == sum(c.single_model for c in two) == 18
    assert not any(c.stages[1].skipped and not c.stages[2].skipped for c in three)
    assert all(len({(c.stages[i].k, c.stages[i].l) for i in (1, 2)}) == 2 for c in three if c.running[-2:] == [1, 2])


# ---- self-tests --------------------------------------------------------------------


def test_extraction_keeps_distinct_compiling_asserts_on_the_entry_point():
    reply = (
        "```python\nassert add(1, 2) == 3\n"
        "assert add(1, 2) == 3\n"  # duplicate
        "assert add(1,2)==3  # the same line, spelt otherwise\n"
        "assert add('a', \"b\") == 'ab'\n"
        "assert sub(1, 2) == -1\n"  # another function
        "assert add(1,\n"  # does not compile alone
        "print(add(2, 2))\n"  # not an assert
        "assert add(0, 0) == 0  # zero\n"
        "assert add(-1, 1) == 0\n"
        "```\nassert add(9, 9) == 18\n"  # after the fence
    )
    assert extract_test_lines(reply, "add", 4) == ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'",
                                                   "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]  # fmt: skip
    assert extract_test_lines(reply, "add", 2) == ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"]
    assert extract_test_lines('assert add(f"{1:\\n}") == 1', "add", 4) == []  # unparsed over two lines: no line
    assert extract_test_lines("assert not add(1, 2) == 4\nassert x(add(1, 1))", "add", 4) == [
        "assert not add(1, 2) == 4",
        "assert x(add(1, 1))",
    ]


def test_a_line_that_parses_but_cannot_run_alone_is_no_test_line():
    assert extract_test_lines("assert (yield add(1))\nassert await add(2)\nassert add(3) == 3", "add", 4) == [
        "assert add(3) == 3"
    ]


def test_a_self_test_on_the_arguments_of_a_shown_official_test_repeats_it():
    cp = next(p for p in load_cascade_problems("mbpp", 3))
    assert cp.shown_tests == cp.problem.tests and all(t in cp.problem.user_message for t in cp.shown_tests)
    shown = cp.shown_tests[0]
    call = shown[shown.index(cp.entry_point) :]
    assert repeats_shown_test(shown, cp)  # a copy
    args = call[call.index("(") : _matching_paren(call) + 1]
    assert repeats_shown_test(f"assert {cp.entry_point}{args} == 'anything else'", cp)  # the same inputs, re-spaced
    assert repeats_shown_test(f"assert   {cp.entry_point} {args.replace(', ', ',')} is not None", cp)
    assert not repeats_shown_test(f"assert {cp.entry_point}(123456789) == 0", cp)  # new inputs are its own
    he = load_cascade_problems("humaneval", 1)[0]
    assert he.shown_tests == () and not repeats_shown_test(f"assert {he.entry_point}([1.0, 2.0], 0.5) == False", he)
    keep = own_test_filter([cp, he])
    assert not keep(cp.task_id, shown) and keep(he.task_id, shown)


def _matching_paren(text: str) -> int:
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ")" and depth == 0:
            return i
    raise AssertionError(text)


def test_prompts_start_the_reply_with_an_assert_on_the_entry_point():
    he = load_cascade_problems("humaneval", 1)[0]
    chat = self_test_prompt(he, 4, "chat")
    assert chat.response_prefix.endswith(f"assert {he.entry_point}(") and chat.messages
    assert "Write 4 lines of testing code" in chat.messages[0]["content"]
    paper = self_test_prompt(he, 2, "completion")
    assert paper.raw.startswith(he.spec.rstrip()) and "    pass\n" in paper.raw
    assert "# Assume the above function is completed. Write 2 lines of testing code for the function." in paper.raw
    assert paper.raw.endswith(f"assert {he.entry_point}(")


def test_problems_carry_entry_point_and_a_reference_that_passes_the_official_tests():
    from codeaccel.sandbox import execute

    for cp in load_cascade_problems("humaneval", 2) + load_cascade_problems("mbpp", 2):
        assert cp.entry_point in cp.reference
        official = cp.problem.test_setup + "\n" if cp.problem.test_setup else ""
        result = execute(cp.reference + "\n" + official, cp.problem.tests)
        assert result.passed, (cp.task_id, result.setup_error)
    assert mbpp_entry_point(["assert similar_elements((3, 4), (5, 4)) == (4,)"], "def similar_elements(a, b):") == (
        "similar_elements"
    )


# ---- cost --------------------------------------------------------------------------


def _costs():
    # step seconds: b=1: 0.1, b=2: 0.12, b=4: 0.16
    return {b: BatchCost("m", b, s / b, 0.001, 100, "cpu") for b, s in ((1, 0.1), (2, 0.12), (4, 0.16))}


def test_batched_generation_is_priced_from_the_measured_step_cost():
    costs = _costs()
    assert step_seconds(costs, 3) == pytest.approx(0.14)
    assert step_seconds(costs, 8) == pytest.approx(0.32)  # two batches of the largest measured
    assert generation_seconds(costs, [100], 16) == pytest.approx(10.0)
    assert generation_seconds(costs, [25] * 4, 16) == pytest.approx(25 * 0.16)  # four at once throughout
    # 10 steps at b=4, then 10 at b=3 (0.14), 20 at b=2, 60 alone: the longest answer's tail at b=1's price
    assert generation_seconds(costs, [10, 20, 40, 100], 16) == pytest.approx(10 * 0.16 + 10 * 0.14 + 20 * 0.12 + 6.0)
    # at most two at once: 10 and 20 run, 40 joins when 10 ends, 100 when 20 ends
    assert generation_seconds(costs, [10, 20, 40, 100, 0], 2) == pytest.approx(
        10 * 0.12 + 10 * 0.12 + 30 * 0.12 + 70 * 0.1
    )
    assert usd(3600, 0.44) == pytest.approx(0.44)


def test_measured_costs_are_scaled_to_what_the_sweep_spent_by_the_median_ratio():
    costs = _costs()  # b=2: 0.06 s per token; 0.001 s per prompt token
    # priced: 10 tokens at b=2 (0.6 s) + a tenth of a 100-token prompt's prefill (0.01 s) = 0.61 s
    spend = [Spend(10, 1.22, 2.0, 100, 10), Spend(20, 2.42, 2.0, 100, 10), Spend(10, 0.61, 2.0, 100, 10),
             Spend(10, 610.0, 2.0, 100, 10), Spend(4, 9.0, 2.0, 100, 10), Spend(10, 0.0, 2.0, 100, 10)]  # fmt: skip
    # ratios 2, 2, 1, 1000 (a step stretched by a pause); too short and unmeasured ones do not count
    assert spent_scale(costs, spend) == pytest.approx(2.0)
    assert spent_scale(costs, []) == 1.0
    doubled = scaled(costs, 2.0)
    assert step_seconds(doubled, 3) == pytest.approx(2 * step_seconds(costs, 3))
    assert doubled[1].s_per_prompt_token == pytest.approx(2 * costs[1].s_per_prompt_token)


# ---- store and replay --------------------------------------------------------------


def _gen(task, kind, sample, l=0, text="", tokens=10):  # noqa: E741
    return StoredGeneration("m", "humaneval", task, kind, l, sample, 0.0 if sample < 0 else 0.8, 1.0 if sample < 0
                            else 0.95, 50, tokens, text, "stop", 0.1, 0.5, 0.2, 2.0)  # fmt: skip


def _fill(store, task, answers_pass, lines_pass, n_samples=3, ls=(2,)):
    """answers_pass[i]: official result of answer i (index 0 greedy, then samples); lines_pass[i]: per line;
    ``ls``: the l of the stored tests (each test gives the first two lines)."""
    lines = [f"assert f({i}) == {i}" for i in range(len(lines_pass[0]))]
    rows = [_gen(task, "answer", s) for s in [-1] + list(range(n_samples))]
    rows += [_gen(task, "test", s, n, "\n".join(lines[:2])) for n in ls for s in [-1] + list(range(n_samples))]
    ids = store.add_generations(rows)
    answer_ids, test_ids = ids[: n_samples + 1], ids[n_samples + 1 :]
    store.add_executions(
        "m", "humaneval", task,
        test_lines={tid: [(line, True) for line in lines[:2]] for tid in test_ids},
        answer_results={aid: (ok, "passed" if ok else "failed") for aid, ok in zip(answer_ids, answers_pass)},
        line_results={aid: dict(zip(lines, row)) for aid, row in zip(answer_ids, lines_pass)},
    )  # fmt: skip
    store.replace_batch_costs("m", [BatchCost("m", b, 0.1 / b, 0.001, 100, "cpu") for b in (1, 2, 4, 8)])


def test_store_is_durable_and_refuses_duplicates(tmp_path):
    path = tmp_path / "store.sqlite"
    with GenerationStore(path) as store:
        _fill(store, "T/0", [True] * 4, [[True, True]] * 4)
        with pytest.raises(sqlite3.IntegrityError):
            store.add_generations([_gen("T/0", "answer", -1)])
        assert len(store.generations("m", "humaneval", "T/0")) == 8  # the failed transaction added nothing
    with GenerationStore(path) as again:
        assert again.generated_tasks("m", "humaneval") == {"T/0"}
        assert again.executed_tasks("m", "humaneval") == {"T/0"}
        assert again.line_validity("m", "humaneval")[0]["validity"] == 1.0
    (tmp_path / "bad.sqlite").write_text("not a database")
    with pytest.raises(UserError):
        GenerationStore(tmp_path / "bad.sqlite")


def test_replay_takes_the_answer_the_stage_accepts(tmp_path):
    with GenerationStore(tmp_path / "s.sqlite") as store:
        # greedy (index 0) fails the official tests and passes no line; samples 0..2 pass both lines
        _fill(store, "T/0", [False, True, True, True], [[False, False], [True, True], [True, True], [True, True]])
        replay = Replay(store, "humaneval", ["T/0"])
        greedy = make_config([Stage("m", 1, 2)], 0.0)
        sampled = make_config([Stage("m", 3, 2)], 0.0)
        assert replay.outcome(greedy, "T/0").passed is False
        out = replay.outcome(sampled, "T/0")
        assert out.passed is True and out.stopped_at == 0
        run = replay.stage_run(Stage("m", 3, 2), "T/0")
        assert run.passes.shape == (3, 2) and run.n_sequences == 6 and run.gen_tokens == 60
        assert out.cost_s == pytest.approx(run.gen_s + run.prompt_s)
        assert run.gen_s == pytest.approx(60 * 0.1 / 6)  # every measured step costs 0.1 s: 6 sequences per step
        with pytest.raises(UserError, match="no stored answer sample"):
            replay.stage_run(Stage("m", 5, 2), "T/0")
        assert replay.any_passes("m", 1, ["T/0"]) == 1.0  # sample 0 passes (the greedy answer is no sample)
        # each stored generation spent 0.1 s on 10 tokens at a mean batch of 2 (0.05 s per token measured) and
        # shared a 50-token prompt with 3 others (50 * 0.001 / 4 s): 0.1 / 0.5125 of the measured costs
        calibrated = Replay(store, "humaneval", ["T/0"], calibrate=True)
        assert calibrated.stage_run(Stage("m", 3, 2), "T/0").gen_s == pytest.approx(0.1 / 0.5125 * run.gen_s)
        assert calibrated.cost_scale("m") == pytest.approx(0.1 / 0.5125)


def test_a_replay_counts_only_the_lines_it_keeps_and_validity_says_how_many_it_left_out(tmp_path):
    with GenerationStore(tmp_path / "s.sqlite") as store:
        # every answer passes line 0 ("assert f(0) == 0"); only sample 1 passes line 1, and the official tests
        _fill(store, "T/0", [False, False, True, False], [[True, False], [True, False], [True, True], [True, False]])
        stage = Stage("m", 3, 2)
        every = Replay(store, "humaneval", ["T/0"])
        assert every.stage_run(stage, "T/0").lines == ("assert f(0) == 0", "assert f(1) == 1")
        assert every.outcome(make_config([stage], 0.0), "T/0").passed is True  # line 1 singles out sample 1
        dropped = Replay(store, "humaneval", ["T/0"], keep_line=lambda task, line: line != "assert f(1) == 1")
        run = dropped.stage_run(stage, "T/0")
        assert run.lines == ("assert f(0) == 0",) and run.passes.shape == (3, 1)
        assert dropped.outcome(make_config([stage], 0.0), "T/0").passed is False  # now a tie: sample 0 is taken
        (v,) = store.line_validity("m", "humaneval", lambda task, line: line != "assert f(1) == 1")
        assert (v["lines"], v["left_out"], v["tests"]) == (4, 4, 4)
        (every_v,) = store.line_validity("m", "humaneval")
        assert (every_v["lines"], every_v["left_out"]) == (8, 0)


def test_cascade_escalates_when_the_small_model_is_unsure(tmp_path):
    with GenerationStore(tmp_path / "s.sqlite") as store:
        _fill(store, "T/0", [False] * 4, [[False, False]] * 4)
        replay = Replay(store, "humaneval", ["T/0"])
        # the same stored model twice stands for small and large: the first escalates at θ > 0
        config = make_config([Stage("m", 3, 2), Stage("m", 0, 0)], 0.5)
        out = replay.outcome(config, "T/0")
        assert out.stopped_at == 1
        first = replay.stage_run(Stage("m", 3, 2), "T/0")
        second = replay.stage_run(Stage("m", 0, 0), "T/0")
        assert out.cost_s == pytest.approx(first.gen_s + first.prompt_s + second.gen_s + second.prompt_s)


def test_a_model_following_itself_pays_only_for_what_it_adds(tmp_path):
    with GenerationStore(tmp_path / "s.sqlite") as store:
        # every answer fails every line: the first stage is unsure and escalates at θ > 0
        _fill(store, "T/0", [False] * 3 + [True] * 3, [[False, False]] * 6, n_samples=5)
        replay = Replay(store, "humaneval", ["T/0"])
        first, second = Stage("m", 3, 2), Stage("m", 5, 2)
        out = replay.outcome(make_config([first, second], 0.5), "T/0")
        assert out.stopped_at == 1
        a, b = replay.stage_run(first, "T/0"), replay.stage_run(second, "T/0")
        # added: samples 3 and 4, answer and test each, 10 tokens, decoded together (every step costs 0.1 s)
        assert out.gen_tokens == a.gen_tokens + 40 and b.gen_tokens == 100
        assert out.cost_s == pytest.approx(a.gen_s + a.prompt_s + 10 * 0.1 + b.prompt_s)
        assert b.gen_s == pytest.approx(10 * 0.1 * 10 / 8)  # the same stage alone: 10 sequences, 8 per batch
        # nothing shared (the greedy answer and test, then samples): the later stage pays in full
        greedy_first = replay.outcome(make_config([Stage("m", 1, 2), second], 0.5), "T/0")
        g = replay.stage_run(Stage("m", 1, 2), "T/0")
        assert greedy_first.cost_s == pytest.approx(g.gen_s + g.prompt_s + b.gen_s + b.prompt_s)


def test_a_model_following_itself_with_only_new_tests_pays_no_answer_prompt(tmp_path):
    """The same answers tested again with longer tests: only the l=4 tests are generated (as ``cascade solve``
    does), so only their prompt is evaluated; the answers' prompt, generated from by nobody, costs nothing."""
    with GenerationStore(tmp_path / "s.sqlite") as store:
        _fill(store, "T/0", [False] * 4, [[False, False]] * 4, ls=(2, 4))
        replay = Replay(store, "humaneval", ["T/0"])
        first, second = Stage("m", 3, 2), Stage("m", 3, 4)
        out = replay.outcome(make_config([first, second], 0.5), "T/0")
        assert out.stopped_at == 1
        a, b = replay.stage_run(first, "T/0"), replay.stage_run(second, "T/0")
        assert b.prompt_tokens == 100  # alone: the answers' prompt and the tests' (50 tokens each)
        assert out.prompt_tokens == a.prompt_tokens + 50  # after the first: the l=4 tests' prompt only
        assert out.gen_tokens == a.gen_tokens + 30  # three tests of 10 tokens
        assert out.prompt_s == pytest.approx(a.prompt_s + 50 * 0.001)
        assert out.cost_s == pytest.approx(a.gen_s + a.prompt_s + 10 * 0.1 + 50 * 0.001)


def test_local_costs_from_different_cpus_are_refused_and_an_endpoints_are_not(tmp_path):
    """A sweep resumed on another machine kind must not price one model on one CPU and the next on another."""
    with GenerationStore(tmp_path / "s.sqlite") as store:
        _fill(store, "T/0", [True] * 4, [[True, True]] * 4)
        store.replace_batch_costs("big", [BatchCost("big", 1, 0.2, 0.002, 100, "other cpu")])
        store.replace_batch_costs("openai:x", [BatchCost("openai:x", 1, 0.5, 0.01, 100, "endpoint http://h/v1")])
        replay = Replay(store, "humaneval", ["T/0"])
        assert replay.costs("m")[1].cpu == "cpu" and replay.costs("openai:x")[1].s_per_token == 0.5
        with pytest.raises(UserError, match="different CPUs .*--remeasure-costs"):
            replay.costs("big")
        store.replace_batch_costs("big", [BatchCost("big", b, 0.2 / b, 0.002, 100, "cpu") for b in (1, 2)])
        assert sorted(replay.costs("big")) == [1, 2]  # measured again on one machine: accepted, old rows gone


# ---- tuner -------------------------------------------------------------------------


def _point(cost, accuracy, label):
    config = make_config([Stage(label, 0, 0)], 0.0)
    n = 10
    outcomes = [ProblemOutcome(str(i), i < accuracy * n, 0, cost, 0.0, 1, 1) for i in range(n)]
    return Evaluation(config, "cascade", outcomes)


def test_pareto_front_keeps_only_undominated_points():
    points = [_point(1.0, 0.5, "a"), _point(2.0, 0.4, "b"), _point(2.0, 0.7, "c"), _point(3.0, 0.7, "d"),
              _point(0.5, 0.2, "e")]  # fmt: skip
    front = pareto_front(points)
    assert [p.config.stages[0].model for p in front] == ["e", "a", "c"]


def _result(tune_points, validate_points) -> TuneResult:
    """A TuneResult over hand-made evaluations (tune and validate lists of the same configurations)."""
    front = pareto_front(tune_points)
    by_config = {e.config: e for e in validate_points}
    return TuneResult("cascade", ["T/0"], ["T/1"], list(tune_points), front,
                      pareto_front([e for e in tune_points if e.config.single_model]),
                      [by_config[e.config] for e in front], [e for e in validate_points if e.config.single_model],
                      list(validate_points))  # fmt: skip


def _at(config, cost, passed, task="T/0"):
    return Evaluation(config, "cascade", [ProblemOutcome(task, passed, 0, cost, 0.0, 10, 5)])


def test_the_saving_compares_points_chosen_on_tune_and_reports_them_on_validation():
    single = make_config([Stage("a", -1, 0), Stage("b", 10, 2)], 0.0)
    other_single = make_config([Stage("a", -1, 0), Stage("b", 0, 0)], 0.0)
    cascade = make_config([Stage("a", 3, 2), Stage("b", 10, 2)], 0.5)
    dear = make_config([Stage("a", 5, 2), Stage("b", 10, 2)], 0.5)
    tune_points = [_at(single, 3.0, True), _at(other_single, 1.0, False), _at(cascade, 2.0, True),
                   _at(dear, 4.0, True)]  # fmt: skip
    # on validation the other single model would look best and the cascade fails: neither decides
    validate_points = [_at(single, 3.3, False, "T/1"), _at(other_single, 1.1, True, "T/1"),
                       _at(cascade, 2.2, False, "T/1"), _at(dear, 4.4, True, "T/1")]  # fmt: skip
    comparison = _result(tune_points, validate_points).comparison()
    assert comparison.best_single.tune.config == single and comparison.best_single.validate.cost_s == 3.3
    assert comparison.cascade.tune.config == cascade and not comparison.cascade.validate.pass_at_1
    assert comparison.saving == pytest.approx(1 - 2.2 / 3.3)  # validation costs of the points chosen on tune
    alone = _result(tune_points[:2], validate_points[:2]).comparison()
    assert alone.cascade is None and alone.saving is None  # the best single model is no saving over itself


def test_best_within_a_reference_cost_is_chosen_on_tune_ties_to_the_cheaper():
    ref = make_config([Stage("a", -1, 0), Stage("b", 0, 0)], 0.0)
    c1 = make_config([Stage("a", 1, 2), Stage("b", 0, 0)], 0.5)
    c2 = make_config([Stage("a", 3, 2), Stage("b", 0, 0)], 0.5)
    c3 = make_config([Stage("a", 10, 4), Stage("b", 0, 0)], 0.5)
    tune_points = [_at(ref, 2.0, True), _at(c1, 1.0, True), _at(c2, 1.5, True), _at(c3, 2.5, True)]
    validate_points = [_at(c, cost, True, "T/1") for c, cost in [(ref, 2.0), (c1, 3.0), (c2, 1.0), (c3, 1.0)]]
    result = _result(tune_points, validate_points)
    reference = result.chosen(tune_points[0])
    within = result.best_within(reference)
    assert within.tune.config == c1 and within.validate.cost_s == 3.0  # cheaper on tune, whatever validation says
    assert result.best_within(result.chosen(_at(ref, 0.5, True))) is None


def test_split_is_by_a_seeded_hash_of_the_id_about_30_70_and_stable_as_problems_are_added():
    ids = [f"T/{i}" for i in range(1000)]
    tune_ids, validate_ids = split(ids)
    assert 250 <= len(tune_ids) <= 350 and len(tune_ids) + len(validate_ids) == 1000
    assert not set(tune_ids) & set(validate_ids)
    assert split(ids) == (tune_ids, validate_ids)
    part_tune, part_validate = split(ids[:300])  # a sweep still growing: no problem changes side
    assert set(part_tune) <= set(tune_ids) and set(part_validate) <= set(validate_ids)
    assert split(ids, seed=1)[0] != tune_ids


# ---- end to end on tiny models -----------------------------------------------------


def test_run_then_tune_through_the_cli(tmp_path, tiny_gguf, tiny_gguf_draft):
    """Two tiny models on 10 HumanEval problems: stored, resumable, replayed, reported (rows in the results format)."""
    import json

    from typer.testing import CliRunner

    from codeaccel.cli import app

    runner = CliRunner()
    models = f"{tiny_gguf},{tiny_gguf_draft}"
    args = ["cascade", "run", "humaneval", "--models", models, "--limit", "10", "--max-tokens", "24",
            "--out", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with GenerationStore(tmp_path / "store.sqlite") as store:
        n_rows = len(store.generations("tiny", "humaneval", "HumanEval/0"))
        assert n_rows == 1 + 10 + 2 * (1 + 10)  # greedy + 10 sampled answers; per l a greedy + 10 sampled tests
        assert store.executed_tasks("tiny-draft", "humaneval") == {f"HumanEval/{i}" for i in range(10)}
        assert sorted(store.batch_costs("tiny")) == [1, 2, 4, 6, 8, 10, 12, 16]
    again = runner.invoke(app, args)  # resumes: nothing to generate
    assert again.exit_code == 0, again.output
    with GenerationStore(tmp_path / "store.sqlite") as store:
        assert len(store.generations("tiny", "humaneval", "HumanEval/0")) == n_rows
    tuned = runner.invoke(app, ["cascade", "tune", "humaneval", "--models", models, "--limit", "10",
                                "--out", str(tmp_path)])  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    doc = json.loads((tmp_path / "cascade-humaneval-cascade.json").read_text())
    n_tune = len(split([f"HumanEval/{i}" for i in range(10)])[0])
    assert doc["n_tune"] == n_tune and doc["n_validate"] == 10 - n_tune and doc["n_configs"] == 72 * 11 + 18
    assert doc["summary"]["chosen_on"] == "tune" and "tune_pass_at_1" in doc["summary"]["best_single_model"]
    assert doc["generation"] == {"test_format": "chat", "max_tokens": 24, "engine": "llama.cpp"}  # for solve
    assert doc["models"] == {
        name: str(Path(f).resolve()) for name, f in [("tiny", tiny_gguf), ("tiny-draft", tiny_gguf_draft)]
    }
    assert doc["config"]["shown_tests"] == "exclude" and doc["config"]["scorer"] == "cascade"
    assert set(doc["cost_scales"]) == {"tiny", "tiny-draft"} and all(f > 0 for f in doc["cost_scales"].values())
    assert all(row["prompt_tokens"] > 0 for row in doc["rows"])  # counted apart from the generated tokens
    for row in doc["rows"]:
        for field in ("dataset", "engine", "method", "model", "n_problems", "pass_at_1", "tokens_per_s",
                      "split", "cost_usd", "config"):  # fmt: skip
            assert field in row
        assert row["method"] in ("cascade", "single-model") and row["cost_usd"] > 0
    assert (tmp_path / "cascade-humaneval-cascade.png").stat().st_size > 0
    alone = doc["greedy_alone"]  # per token and per problem, each model alone: the 0.5B's longer answers show here
    assert [r["model"] for r in alone] == ["tiny", "tiny-draft"]
    assert all(r["n_problems"] == 10 and r["s_per_token"] > 0 and r["cost_s"] > 0 for r in alone)
    assert "per token and per problem" in (tmp_path / "cascade-humaneval-cascade.md").read_text()
    spent = {r["model"]: r for r in doc["spent_in_sweep"]}  # seconds per token as the sweep actually spent them
    assert set(spent) == {"tiny", "tiny-draft"} and all(r["s_per_token"] > 0 and r["mean_batch"] >= 1
                                                        for r in spent.values())  # fmt: skip
    assert spent["tiny"]["generations"] == 10 * (1 + 10 + 2 * (1 + 10))
    headroom = {r["model"]: r for r in doc["any_sample_passes"]}  # a perfect selector's pass@1, never falling in k
    assert set(headroom) == {"tiny", "tiny-draft"}
    assert all(0 <= r["k=3"] <= r["k=5"] <= r["k=10"] <= 1 for r in headroom.values())
    one = tmp_path / "one"
    elsewhere = runner.invoke(app, ["cascade", "tune", "humaneval", "--models", tiny_gguf, "--limit", "10",
                                    "--store", str(tmp_path / "store.sqlite"), "--out", str(one)])  # fmt: skip
    assert elsewhere.exit_code == 0, elsewhere.output  # another store's replay, its reports in their own folder
    assert json.loads((one / "cascade-humaneval-cascade.json").read_text())["n_configs"] == 9  # one model's (k, l)
    assert not (one / "store.sqlite").exists()
    bad = runner.invoke(app, ["cascade", "run", "humaneval", "--models", models, "--limit", "10",
                              "--max-tokens", "30", "--out", str(tmp_path)])  # fmt: skip
    assert isinstance(bad.exception, UserError) and "other settings" in str(bad.exception)  # refused


def test_a_second_run_on_a_store_being_written_is_refused_before_it_writes(tmp_path):
    from codeaccel.cascade.run import RunConfig, run_cascade_generation

    config = RunConfig(models=("qwen2.5-coder-0.5b-instruct",), dataset="humaneval", limit=1)
    with GenerationStore(tmp_path / "store.sqlite") as first, first.writer():
        with GenerationStore(tmp_path / "store.sqlite") as second:
            with pytest.raises(UserError, match="being written by another `cascade run`"):
                run_cascade_generation(config, second)
            assert second.meta("run_config") is None  # nothing written
    with GenerationStore(tmp_path / "store.sqlite") as store, store.writer():
        pass  # released with the first run


def test_each_problem_is_executed_as_soon_as_stored_and_an_interrupted_run_resumes(tmp_path, tiny_gguf, monkeypatch):
    """A sweep stopped mid-way can be replayed on what it generated: each problem is executed right after its
    generations are stored (not after the model's last problem); a problem stored but not executed when the
    run stopped is executed by the next run, and nothing is generated twice."""
    import codeaccel.cascade.run as run

    config = run.RunConfig(models=(tiny_gguf,), dataset="humaneval", limit=3, max_tokens=8)
    real = run.execute_problem
    calls: list[tuple[str, set[str]]] = []  # (task executed, tasks generated at that moment)

    def execute_then_stop(store, pool, model, cp, limits):
        calls.append((cp.task_id, store.generated_tasks(model, cp.dataset)))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(store, pool, model, cp, limits)

    monkeypatch.setattr(run, "execute_problem", execute_then_stop)
    with GenerationStore(tmp_path / "store.sqlite") as store, pytest.raises(KeyboardInterrupt):
        run.run_cascade_generation(config, store)
    (first, generated_then), (second, _) = calls
    assert first in generated_then and len(generated_then) < 3  # executed before the last problem was generated
    with GenerationStore(tmp_path / "store.sqlite") as store:
        assert store.executed_tasks("tiny", "humaneval") == {first}
        assert second in store.generated_tasks("tiny", "humaneval")  # stored, not executed
        before = {t: store.generations("tiny", "humaneval", t) for t in store.generated_tasks("tiny", "humaneval")}
    monkeypatch.setattr(run, "execute_problem", real)
    with GenerationStore(tmp_path / "store.sqlite") as store:
        run.run_cascade_generation(config, store)
        assert store.executed_tasks("tiny", "humaneval") == {f"HumanEval/{i}" for i in range(3)}
        assert all(store.generations("tiny", "humaneval", t) == rows for t, rows in before.items())  # none again


def test_results_of_other_sandbox_rules_are_refused_until_executed_again(tmp_path, tiny_gguf, monkeypatch):
    """One store, one set of sandbox rules: a store executed under older rules is not added to, and
    ``re_execute`` runs its stored generations again (nothing generated again), replacing every result."""
    import codeaccel.cascade.run as run
    from codeaccel.sandbox.execution import RULES_VERSION

    config = run.RunConfig(models=(tiny_gguf,), dataset="humaneval", limit=2, max_tokens=8)
    with GenerationStore(tmp_path / "store.sqlite") as store:
        run.run_cascade_generation(config, store)
        assert store.execution_rules() == RULES_VERSION
        generated = {t: store.generations("tiny", "humaneval", t) for t in store.generated_tasks("tiny", "humaneval")}
        answer = generated["HumanEval/0"][0]
        store._db.execute("DELETE FROM meta WHERE key = 'sandbox_rules'")  # a store from before rules were kept
        store._db.execute("INSERT OR REPLACE INTO line_results VALUES (?, 'assert stale(1)', 1)", (answer.id,))
        assert store.execution_rules() == 1
    with GenerationStore(tmp_path / "store.sqlite") as store:
        with pytest.raises(UserError, match=f"sandbox rules 1, and this codeaccel's are {RULES_VERSION}.*--re-execute"):
            run.run_cascade_generation(run.RunConfig(models=(tiny_gguf,), dataset="humaneval", limit=3, max_tokens=8),
                                       store)  # fmt: skip
        assert store.generated_tasks("tiny", "humaneval") == set(generated)  # refused before generating
    executed: list[str] = []
    real = run.execute_problem
    monkeypatch.setattr(run, "execute_problem", lambda st, pool, m, cp, limits: executed.append(cp.task_id)
                        or real(st, pool, m, cp, limits))  # fmt: skip
    with GenerationStore(tmp_path / "store.sqlite") as store:
        run.run_cascade_generation(replace(config, re_execute=True), store)
        assert sorted(executed) == sorted(generated) and store.execution_rules() == RULES_VERSION
        assert {t: store.generations("tiny", "humaneval", t) for t in generated} == generated  # none again
        assert "assert stale(1)" not in store.line_results([answer.id])[answer.id]  # replaced whole
        assert store.executed_tasks("tiny", "humaneval") == set(generated)
        # a re-execution drops every result, so it must run on all the store holds
        problems = load_cascade_problems("humaneval", 2)
        for narrower, problems_run in ((replace(config, re_execute=True), problems[:1]),
                                       (replace(config, re_execute=True, models=()), problems)):  # fmt: skip
            with pytest.raises(UserError, match="--re-execute drops every execution result"):
                run._check_execution_rules(store, narrower, problems_run)
        assert store.executed_tasks("tiny", "humaneval") == set(generated)  # refused before anything was dropped


@pytest.mark.parametrize(
    "args,message",
    [
        (["cascade", "run", "humaneval", "--n-seq-max", "0", "--out", "{tmp}"], "--n-seq-max"),
        (["cascade", "run", "humaneval", "--test-format", "xml", "--out", "{tmp}"], "--test-format"),
        (["cascade", "run", "apps", "--out", "{tmp}"], "the cascade runs on humaneval, mbpp"),
        (["cascade", "run", "humaneval", "--models", " , ", "--out", "{tmp}"], "--models"),
        (
            [
                "cascade",
                "run",
                "humaneval",
                "--models",
                "0.5b,openai:m@http://h:9/v1",
                "--answers-from",
                "{tmp}/o",
                "--out",
                "{tmp}",
            ],
            "an endpoint stage generates its own",
        ),
        (["cascade", "tune", "humaneval", "--out", "{tmp}/nothing"], "no cascade store"),
        (["cascade", "tune", "humaneval", "--scorer", "vote", "--out", "{tmp}"], "--scorer"),
        (["cascade", "solve", "--stages", "m:0:0"], "give a function"),
        (["cascade", "solve", "{tmp}/f.py", "--task", "HumanEval/0", "--stages", "m:0:0"], "give a function"),
        (["cascade", "solve", "--task", "HumanEval/0"], "give --stages or --tuned"),
        (["cascade", "solve", "--task", "HumanEval/0", "--stages", "m:1"], "MODEL:K:L"),
        (["cascade", "solve", "--task", "HumanEval/0", "--stages", "m:1:2", "--theta", "2"], "θ must be in"),
        (["cascade", "solve", "--task", "HumanEval/0", "--stages", "m:0:0", "--budget", "1"], "--budget picks"),
        (["cascade", "solve", "--task", "HumanEval/0", "--tuned", "{tmp}/none.json"], "no such report"),
        (["cascade", "solve", "--task", "HumanEval/0", "--stages", "{tmp}/no.gguf:0:0"], "no.gguf"),
        (["cascade", "solve", "--task", "HumanEval/999", "--stages", "qwen2.5-coder-0.5b-instruct:0:0"], "no problem"),
        (["cascade", "solve", "{tmp}/no.py", "--stages", "qwen2.5-coder-0.5b-instruct:0:0"], "no such file"),
        (["cascade", "solve", "-", "--stages", "qwen2.5-coder-0.5b-instruct:0:0", "--scorer", "x"], "--scorer"),
    ],
)
def test_bad_cascade_input_is_one_line_exit_2(args, message, tmp_path):
    from test_cli import run_cli

    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store.sqlite").exists() or args[1] == "tune"  # nothing stored by a refused run


def test_a_model_without_a_chat_template_stops_the_run_and_keeps_what_is_stored(tmp_path, tiny_gguf):
    """Every local model's costs are measured before anything is generated (one machine for the family's
    costs): a model without a chat template stops the run there, and what the store held is kept."""
    import tiny_models
    from test_cli import run_cli

    bare = tiny_models.build_gguf_model(tmp_path / "bare.gguf", seed=2, chat_template=False)
    out = tmp_path / "run"
    base = ["cascade", "run", "humaneval", "--limit", "2", "--max-tokens", "8", "--out", str(out)]
    assert run_cli(*base, "--models", tiny_gguf).returncode == 0
    with GenerationStore(out / "store.sqlite") as store:
        before = store.batch_costs("tiny")
    result = run_cli(*base, "--limit", "3", "--models", f"{tiny_gguf},{bare}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # llama.cpp logs its own warnings too
    assert lines[-1].startswith("error: ") and "no chat template" in lines[-1]
    assert [line for line in lines if line.startswith("error")] == lines[-1:] and "Traceback" not in result.stderr
    with GenerationStore(out / "store.sqlite") as store:  # the first model's work is kept, nothing more generated
        assert store.executed_tasks("tiny", "humaneval") == {"HumanEval/0", "HumanEval/1"}
        assert store.generated_tasks("tiny", "humaneval") == {"HumanEval/0", "HumanEval/1"}
        assert not store.generated_tasks("bare", "humaneval") and not store.batch_costs("bare")
        assert store.batch_costs("tiny") == before  # measured once, kept
        store.replace_batch_costs("tiny", [replace(c, cpu="another machine") for c in before.values()])
    again = run_cli(*base, "--models", tiny_gguf, "--remeasure-costs")
    assert again.returncode == 0, again.stderr
    with GenerationStore(out / "store.sqlite") as store:  # measured again here, every batch size
        after = store.batch_costs("tiny")
        assert sorted(after) == sorted(before) and {c.cpu for c in after.values()} == {before[1].cpu}


def test_tests_in_another_format_are_generated_for_the_same_answers(tmp_path, tiny_gguf):
    """--answers-from: the answers (and their costs) are another store's, only tests are generated; refused
    where that store lacks them or made them with other settings."""
    from typer.testing import CliRunner

    from codeaccel.cli import app

    runner = CliRunner()
    chat, completion = tmp_path / "chat", tmp_path / "completion"
    base = ["cascade", "run", "humaneval", "--models", tiny_gguf, "--max-tokens", "12"]
    assert runner.invoke(app, [*base, "--limit", "2", "--out", str(chat)]).exit_code == 0
    args = [*base, "--limit", "2", "--test-format", "completion", "--answers-from", str(chat / "store.sqlite"),
            "--out", str(completion)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with GenerationStore(chat / "store.sqlite") as a, GenerationStore(completion / "store.sqlite") as b:
        for task in ("HumanEval/0", "HumanEval/1"):
            ga, gb = a.generations("tiny", "humaneval", task), b.generations("tiny", "humaneval", task)
            answers = [(g.sample, g.text, g.tokens) for g in ga if g.kind == "answer"]
            assert answers == [(g.sample, g.text, g.tokens) for g in gb if g.kind == "answer"]
            tests_a = {g.sample: g.text for g in ga if g.kind == "test" and g.l == 2}
            tests_b = {g.sample: g.text for g in gb if g.kind == "test" and g.l == 2}
            assert sorted(tests_b) == sorted(tests_a) and tests_a[-1].startswith("```python")  # chat: a fence
            assert tests_b[-1].startswith("assert has_close_elements(" if task.endswith("/0") else "assert ")
        assert b.executed_tasks("tiny", "humaneval") == {"HumanEval/0", "HumanEval/1"}
        assert b.batch_costs("tiny") == a.batch_costs("tiny")
    source = ["--answers-from", str(chat / "store.sqlite")]
    more = runner.invoke(app, [*base, "--limit", "3", *source, "--out", str(tmp_path / "three")])
    assert isinstance(more.exception, UserError) and "lacks executed answers" in str(more.exception)
    other = runner.invoke(app, [*base[:-1], "20", "--limit", "2", *source, "--out", str(tmp_path / "other")])
    assert isinstance(other.exception, UserError) and "other max_tokens" in str(other.exception)
    with GenerationStore(tmp_path / "other" / "store.sqlite") as refused:
        assert refused.meta("run_config") is None  # nothing written by a refused run


def test_problems_back_to_back_give_what_each_gives_alone(tiny_gguf, monkeypatch):
    """generate_problems: the next prompt group joins as sequences free up (7 sequences, groups of 3,
    three problems of 9 sequences each): problems overlap in the batch, every problem is handed over
    once, with what it gets decoded alone; a group larger than the batch is admitted in parts."""
    from codeaccel.cascade import generation
    from codeaccel.cascade.generation import GenerationSettings, generate_problems
    from codeaccel.engines import load_engine, open_sequences

    steps: list[set[int]] = []  # per decode step, the problems with a sequence in it

    class Watched(generation.BatchDecoder):
        def step(self):
            steps.append({problem_of[tuple(a.request.prompt_tokens)] for a in self._active.values()})
            return super().step()

    engine = load_engine(tiny_gguf, "llama.cpp", n_ctx=4096)
    problems = load_cascade_problems("humaneval", 3)
    settings = GenerationSettings(n_samples=2, max_tokens=8, test_format="chat", n_seq_max=7)
    problem_of = {tuple(p.request.prompt_tokens): i for i, cp in enumerate(problems)
                  for p in generation._plan(engine, cp, settings, True)}  # fmt: skip

    def run(problems, settings) -> dict[str, list]:
        handed: list[tuple[str, list]] = []
        with open_sequences(engine, n_seq_max=settings.n_seq_max, n_ctx=4096) as seqs:
            generate_problems(engine, seqs, problems, settings, lambda cp, rows: handed.append((cp.task_id, rows)))
        assert len(handed) == len({task for task, _ in handed})  # each problem once
        return dict(handed)

    try:
        alone = {task: rows for cp in problems for task, rows in run([cp], settings).items()}
        monkeypatch.setattr(generation, "BatchDecoder", Watched)
        together = run(problems, settings)
        narrow = run(problems[:1], GenerationSettings(2, 8, "chat", n_seq_max=2))  # groups of 3 on 2 sequences
    finally:
        engine.close()

    def key(row):  # the short greedy answers whole; the rest by their place only: over a long sequence this
        # random tiny model's flat logits let the float noise of other batch shapes flip a token (decoding
        # in a batch is pinned equal to decoding alone in test_sequences)
        exact = row.kind == "answer" and row.sample < 0
        return (row.kind, row.l, row.sample) + ((row.text, row.tokens, row.finish_reason) if exact else ())

    assert sorted(together) == sorted(alone)
    for task, rows in together.items():
        assert len(rows) == 9 and sorted(map(key, rows)) == sorted(map(key, alone[task]))
        assert all(0 < row.batch_size <= 7 and row.tokens > 0 for row in rows)
    assert any(len(active) > 1 for active in steps)  # a problem's sequences ran beside the next one's
    (task,) = narrow
    assert sorted(map(key, narrow[task])) == sorted(map(key, alone[task]))


def test_a_meta_value_that_is_not_json_is_a_user_error_naming_the_key_and_the_store(tmp_path):
    path = tmp_path / "store.sqlite"
    with GenerationStore(path) as store:
        store.set_meta("run_config", {"dataset": "mbpp"})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '{\"dataset\": ' WHERE key = 'run_config'")
    db.close()
    with GenerationStore(path) as store:
        with pytest.raises(UserError, match="'run_config'") as refused:
            store.meta("run_config")
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
        assert store.meta("schema_version") == 1  # the other values still read


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE completions (id INTEGER PRIMARY KEY, text TEXT)",  # another program's tables, even empty
        "CREATE TABLE generations (id INTEGER); INSERT INTO generations VALUES (1)",  # data, no schema version
    ],
)
def test_a_foreign_sqlite_file_is_refused_before_any_table_is_added(sql, tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(sql)
    db.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="not a cascade store"):
        GenerationStore(path)
    assert path.read_bytes() == before  # no table, no journal mode written
    with GenerationStore(tmp_path / "new.sqlite") as store:  # a new file still opens, and again once made
        store.set_meta("k", 1)
    with GenerationStore(tmp_path / "new.sqlite") as store:
        assert store.meta("k") == 1
