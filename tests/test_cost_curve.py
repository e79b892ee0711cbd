import pytest

from codeaccel.engines import load_engine
from codeaccel.engines.cost_curve import CostCurve, load_cost_curve, measure_cost_curve, save_cost_curve


def test_measure_save_load(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    with load_engine(tiny_gguf, "llama.cpp", n_ctx=256) as eng:
        curve = measure_cost_curve(eng, k_max=6, repeats=2, context_tokens=32)
        assert eng.n_tokens == 32  # the context is left as it was
    assert curve.k == [1, 2, 3, 4, 5, 6] and len(curve.seconds) == 6
    assert curve.relative[0] == 1.0 and all(s > 0 for s in curve.seconds)
    save_cost_curve(curve)
    loaded = load_cost_curve("llama.cpp", curve.model)
    assert loaded == curve
    assert load_cost_curve("hf", curve.model, "bfloat16") is None


def test_cost_interpolates_and_extrapolates():
    curve = CostCurve("m", "e", None, 8, 1, [1, 2, 3], [0.1, 0.15, 0.2], [1.0, 1.5, 2.0])
    assert curve.cost(2) == 1.5
    assert curve.cost(5) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        curve.cost(0)
    noisy = CostCurve("m", "e", None, 8, 1, [1, 2, 3, 4], [0.1] * 4, [1.0, 2.0, 4.1, 4.0])  # a noisy last point
    assert noisy.cost(64) >= noisy.cost(4) and noisy.cost(64) > 4.0 * 4  # the tail's trend, not 4.1 -> 4.0
    flat = CostCurve("m", "e", None, 8, 1, [1, 2, 3], [0.1] * 3, [1.0, 3.0, 2.0])
    assert flat.cost(40) >= 2.0  # never below the last measured point


def test_context_too_small_is_refused(tiny_gguf):
    from codeaccel.errors import UserError

    with load_engine(tiny_gguf, "llama.cpp", n_ctx=64) as eng, pytest.raises(UserError, match="exceeds the engine"):
        measure_cost_curve(eng, k_max=32, context_tokens=eng.n_ctx - 16)
