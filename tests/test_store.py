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
