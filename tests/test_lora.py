"""LoRA adapters of the draft: written as GGUF for llama.cpp, applied and swapped on a loaded model.

Contract: llama.cpp with the base model and our GGUF adapter computes what a model with the
merged weights W + (alpha / r) · B · A computes; ``set_lora(None)`` gives the base model back;
a sequence set on the same model applies an adapter to its own context only.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from codeaccel.engines import load_engine, open_sequences
from codeaccel.errors import CodeaccelError
from codeaccel.personalization.lora_gguf import MODULE_TENSORS, LoraWeights, from_peft_state, write_gguf_lora

PROMPT = "def add(a, b):\n    return a + b\n"


def _random_lora(rank=4, alpha=8.0, seed=3) -> LoraWeights:
    rng = np.random.default_rng(seed)
    dims = {  # (out, in) of each projection in the tiny model
        "self_attn.q_proj": (tiny_models.N_EMBD, tiny_models.N_EMBD),
        "self_attn.k_proj": (tiny_models.N_EMBD // 2, tiny_models.N_EMBD),
        "self_attn.v_proj": (tiny_models.N_EMBD // 2, tiny_models.N_EMBD),
        "self_attn.o_proj": (tiny_models.N_EMBD, tiny_models.N_EMBD),
        "mlp.gate_proj": (tiny_models.N_FF, tiny_models.N_EMBD),
        "mlp.up_proj": (tiny_models.N_FF, tiny_models.N_EMBD),
        "mlp.down_proj": (tiny_models.N_EMBD, tiny_models.N_FF),
    }
    pairs = {}
    for layer in range(tiny_models.N_LAYER):
        for module, (out, inp) in dims.items():
            a = rng.standard_normal((rank, inp)).astype(np.float32) * 0.3
            b = rng.standard_normal((out, rank)).astype(np.float32) * 0.3
            pairs[(layer, module)] = (a, b)
    return LoraWeights(pairs, alpha)


def _merged_gguf(path, lora: LoraWeights):
    """The tiny model with W + (alpha / r) B A written into its weights (unpermuted, as its GGUF is)."""
    import gguf

    base = gguf.GGUFReader(str(tiny_models.build_gguf_model(path.with_suffix(".base.gguf"))))
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in base.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    names = {f"blk.{layer}.{MODULE_TENSORS[m]}.weight": (a, b) for (layer, m), (a, b) in lora.pairs.items()}
    for tensor in base.tensors:
        data = np.array(tensor.data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if tensor.name in names:
            a, b = names[tensor.name]
            data = data + (lora.alpha / lora.rank) * (b @ a)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    lora = _random_lora()
    adapter = _write(lora, root / "adapter.gguf")
    return root, lora, adapter, _merged_gguf(root / "merged.gguf", lora)


def _write(lora, path):
    """The tiny GGUF is llama but stores q and k as Hugging Face does (unpermuted): so does its adapter."""
    return write_gguf_lora(lora, path, "llama", permute_qk=False)


@pytest.fixture
def engines(tiny_gguf, lora_files):
    """The base model and the merged-weights reference, each on its own engine; the adapter file."""
    _, _, adapter, merged = lora_files
    engine = load_engine(tiny_gguf, n_ctx=256)
    reference = load_engine(str(merged), n_ctx=256)
    yield engine, reference, adapter
    reference.close()
    engine.close()


def test_base_plus_adapter_computes_the_merged_model(engines):
    engine, reference, adapter = engines
    tokens = engine.tokenize(PROMPT)
    base = engine.eval(tokens)
    engine.set_lora(adapter)
    tuned = engine.eval(tokens)
    want = reference.eval(tokens)
    np.testing.assert_allclose(tuned, want, atol=2e-3 * np.abs(want).max())
    assert np.abs(tuned - base).max() > 0.1 * np.abs(base).max()  # the adapter changes the model
    engine.set_lora(None)
    np.testing.assert_allclose(engine.eval(tokens), base, atol=1e-4 * np.abs(base).max())


def test_a_sequence_set_applies_its_adapter_to_its_own_context(engines):
    engine, reference, adapter = engines
    tokens = engine.tokenize(PROMPT)
    base = engine.eval(tokens)
    engine.reset()
    with open_sequences(engine, n_seq_max=2, n_ctx=512, unified=False) as seqs:
        seqs.set_lora(adapter)
        seq = seqs.open()
        tuned = seqs.eval({seq: tokens})[seq]
    np.testing.assert_allclose(tuned, reference.eval(tokens), atol=2e-3 * np.abs(tuned).max())
    np.testing.assert_allclose(engine.eval(tokens), base, atol=1e-4 * np.abs(base).max())  # untouched


def test_peft_state_names_map_to_pairs():
    state = {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": np.zeros((2, 8)),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": np.zeros((8, 2)),
    }
    lora = from_peft_state(state, alpha=4.0)
    assert list(lora.pairs) == [(1, "self_attn.q_proj")] and lora.rank == 2
    with pytest.raises(CodeaccelError):
        from_peft_state({"base_model.model.lm_head.lora_A.weight": np.zeros((2, 8))}, 4.0)
    with pytest.raises(CodeaccelError):
        from_peft_state({k: v for k, v in state.items() if "lora_A" in k}, 4.0)


def test_an_adapter_file_that_does_not_fit_is_refused(tiny_gguf, tmp_path):
    wrong = LoraWeights({(0, "self_attn.q_proj"): (np.zeros((2, 7), np.float32), np.zeros((5, 2), np.float32))}, 1.0)
    path = _write(wrong, tmp_path / "wrong.gguf")
    engine = load_engine(tiny_gguf, n_ctx=128)
    try:
        with pytest.raises(CodeaccelError, match="could not load the LoRA adapter"):
            engine.set_lora(path)
    finally:
        engine.close()


def test_a_llama_adapter_permutes_query_and_key_rows_as_the_gguf_conversion_does(tmp_path):
    import gguf

    lora = _random_lora(rank=2)
    path = write_gguf_lora(
        lora, tmp_path / "a.gguf", "llama", n_head=tiny_models.N_HEAD, n_head_kv=tiny_models.N_KV_HEAD
    )
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    head_dim = tiny_models.N_EMBD // tiny_models.N_HEAD
    q_b = lora.pairs[(0, "self_attn.q_proj")][1]
    # rows of head h: the two rope halves interleaved (row 2i = half 0 row i, row 2i+1 = half 1 row i)
    head = q_b[:head_dim]
    want = np.empty_like(head)
    want[0::2], want[1::2] = head[: head_dim // 2], head[head_dim // 2 :]
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"][:head_dim], want)
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"], lora.pairs[(0, "self_attn.v_proj")][1])
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_a"], lora.pairs[(0, "self_attn.q_proj")][0])
    assert {"adapter.type", "adapter.lora.alpha", "general.type"} <= set(gguf.GGUFReader(str(path)).fields)
