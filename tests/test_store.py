from codeaccel.bench.store import ResultStore


def _rec(task, **kw):
    return {"dataset": "d", "task_id": task, "model": "m", "engine": "e", "method": "x", "config": {"t": 0}, **kw}


def test_records_persist_and_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.add(_rec("a", passed=True))
    store.add(_rec("b", passed=False))
    again = ResultStore(path)
    assert again.get(_rec("a"))["passed"] is True
    assert again.get(_rec("c")) is None
    assert again.get({**_rec("a"), "config": {"t": 1}}) is None  # other settings: not a match


def test_torn_last_line_is_skipped_and_next_append_survives(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultStore(path).add(_rec("a", passed=True))
    with open(path, "a") as f:
        f.write('{"dataset": "d", "task_')  # killed mid-write
    store = ResultStore(path)
    assert store.get(_rec("a")) is not None
    store.add(_rec("b", passed=True))
    reread = ResultStore(path)
    assert reread.get(_rec("b"))["passed"] is True


def test_later_record_wins(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.add(_rec("a", passed=False))
    store.discard(_rec("a"))
    assert store.get(_rec("a")) is None
    store.add(_rec("a", passed=True))
    assert ResultStore(path).get(_rec("a"))["passed"] is True


def test_problems_by_cpu_counts_problems_per_machine_of_a_resumed_run():
    """A run resumed on another VM says so: problems per CPU, records without a CPU counted apart, most first."""
    from codeaccel.bench.report import problems_by_cpu

    records = [
        {"dataset": "humaneval", "task_id": "HumanEval/0", "method": "autoregressive"},  # stored before the field
        {"dataset": "humaneval", "task_id": "HumanEval/1", "method": "autoregressive", "cpu": "Xeon"},
        {"dataset": "humaneval", "task_id": "HumanEval/1", "method": "retrieval", "cpu": "Xeon"},
        {"dataset": "humaneval", "task_id": "HumanEval/2", "method": "autoregressive", "cpu": "Xeon"},
        {"dataset": "mbpp", "task_id": "HumanEval/2", "method": "autoregressive", "cpu": "EPYC"},
    ]
    assert problems_by_cpu(records) == {"Xeon": 2, "not recorded": 1, "EPYC": 1}
    assert list(problems_by_cpu(records)) == ["Xeon", "not recorded", "EPYC"]


def test_target_cost_curves_lists_each_curve_a_resumed_run_drafted_with():
    """Each drafting record keeps its curve: a run re-profiled midway reports both, with their problems."""
    from codeaccel.bench.report import target_cost_curves

    epyc = {"date": "2026-11-22", "cpu": "EPYC", "relative": [1.0, 1.6]}
    xeon = {"date": "2026-11-23", "cpu": "Xeon", "relative": [1.0, 1.5]}
    records = [
        {"dataset": "humaneval", "task_id": "HumanEval/0", "method": "autoregressive"},  # no curve: not counted
        {"dataset": "humaneval", "task_id": "HumanEval/0", "method": "retrieval"},  # stored before the field
        {"dataset": "humaneval", "task_id": "HumanEval/1", "method": "retrieval", "target_cost_curve": epyc},
        {"dataset": "humaneval", "task_id": "HumanEval/1", "method": "speculative", "target_cost_curve": epyc},
        {"dataset": "humaneval", "task_id": "HumanEval/2", "method": "retrieval", "target_cost_curve": xeon},
        {"dataset": "humaneval", "task_id": "HumanEval/3", "method": "retrieval", "target_cost_curve": xeon},
        {"dataset": "humaneval", "task_id": "HumanEval/3", "method": "hf-assisted"},
    ]
    assert target_cost_curves(records) == [
        {"curve": xeon, "problems": 2},
        {"curve": None, "problems": 1},  # ties in the order first stored
        {"curve": epyc, "problems": 1},
    ]
    assert target_cost_curves(records[:1]) == []


def test_rewrite_keeps_lines_it_could_not_read(tmp_path):
    """A rescore rewrites the file: unreadable lines (not JSON, not UTF-8, no record, torn) come back verbatim."""
    path = tmp_path / "r.jsonl"
    ResultStore(path).add(_rec("a", passed=False))
    unreadable = [b"{not json\n", b"\xff\xfe not utf-8\n", b'{"dataset": "d"}\n', b'{"dataset": "d", "task_']
    with open(path, "ab") as f:
        f.write(b"".join(unreadable))
    store = ResultStore(path)
    store.get(_rec("a"))["passed"] = True  # a rescore changes a record in place
    store.rewrite()
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[1:] == unreadable[:3] + [unreadable[3] + b"\n"]
    assert ResultStore(path).get(_rec("a"))["passed"] is True
