"""Both engines against the contract, on tiny models built at test time."""

import numpy as np
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.errors import CodeaccelError

PROMPTS = [
    "def add(a, b):\n    return",
    "import json\n\nclass Decoder:",
    "    for i in range(",
    "x = [1, 2, 3]\nprint(",
]


@pytest.fixture(scope="module", params=["llama.cpp", "hf"])
def engine(request, tiny_gguf, tiny_hf):
    path = tiny_gguf if request.param == "llama.cpp" else tiny_hf
    eng = load_engine(path, request.param, n_ctx=512, dtype="float32")
    yield eng
    eng.close()


def test_reports_vocab_and_eog(engine):
    assert engine.n_vocab == 400
    im_end = engine.tokenize("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in engine.eog_token_ids


def test_tokenize_roundtrip_and_special_tokens(engine):
    text = "def f(x):\n    return x * 2\n"
    assert engine.detokenize(engine.tokenize(text)) == text
    chat = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.tokenize("<|im_start|>")[0] == engine.tokenize(chat)[0]


def test_eval_returns_logits_for_every_position(engine):
    engine.reset()
    toks = engine.tokenize(PROMPTS[0])
    logits = engine.eval(toks)
    assert logits.shape == (len(toks), engine.n_vocab)
    assert logits.dtype == np.float32
    assert engine.n_tokens == len(toks)


def test_batch_eval_matches_one_at_a_time(engine):
    toks = engine.tokenize(PROMPTS[1])
    engine.reset()
    batched = engine.eval(toks)
    engine.reset()
    single = np.stack([engine.eval([t])[0] for t in toks])
    np.testing.assert_allclose(batched, single, atol=2e-3, rtol=1e-3)
    assert (batched.argmax(-1) == single.argmax(-1)).all()


def test_rewind_then_eval_reproduces_logits(engine):
    toks = engine.tokenize(PROMPTS[2])
    engine.reset()
    engine.eval(toks[:3])
    first = engine.eval(toks[3:])
    engine.rewind(3)
    assert engine.n_tokens == 3 and engine.tokens == toks[:3]
    # a different continuation, then rewind again: the cache must not keep it
    engine.eval([7, 8, 9])
    engine.rewind(3)
    again = engine.eval(toks[3:])
    np.testing.assert_allclose(first, again, atol=1e-4)


def test_prefill_returns_last_position_logits(engine):
    toks = engine.tokenize(PROMPTS[3])
    engine.reset()
    full = engine.eval(toks)[-1]
    engine.reset()
    last = engine.prefill(toks)
    assert last.shape == (engine.n_vocab,)
    np.testing.assert_allclose(full, last, atol=2e-3, rtol=1e-3)


def test_contract_errors(engine):
    engine.reset()
    with pytest.raises(CodeaccelError):
        engine.eval([])
    with pytest.raises(CodeaccelError, match="out of range"):
        engine.eval([engine.n_vocab])
    engine.eval([5, 6])
    with pytest.raises(CodeaccelError, match="rewind"):
        engine.rewind(3)
    with pytest.raises(CodeaccelError, match="context overflow"):
        engine.eval([5] * engine.n_ctx)
    assert engine.n_tokens == 2  # a refused eval leaves the cache as it was


def _library_greedy(engine, prompt_tokens, n):
    """The engine's own library's greedy generation, for comparison."""
    if engine.kind == "llama.cpp":
        out = []
        for tok in engine.llm.generate(prompt_tokens, temp=0.0, reset=True):
            out.append(tok)
            if len(out) >= n or tok in engine.eog_token_ids:
                break
        engine.llm.reset()
        engine.rewind(0)  # the library's generate used the KV cache
        return out
    import torch

    ids = torch.tensor([prompt_tokens])
    res = engine.model.generate(
        ids, do_sample=False, max_new_tokens=n, eos_token_id=sorted(engine.eog_token_ids), pad_token_id=0
    )
    return res[0, len(prompt_tokens) :].tolist()


def test_greedy_matches_library_generation(engine):
    compared = 0
    for prompt in PROMPTS:
        toks = engine.tokenize(prompt)
        ours = generate(engine, toks, SamplingParams(), max_tokens=40).tokens
        theirs = _library_greedy(engine, toks, 40)
        assert ours == theirs, prompt
        compared += len(ours)
    assert compared >= 40


def test_unknown_engine_and_wrong_model_kind(tiny_hf):
    with pytest.raises(CodeaccelError, match="unknown engine"):
        load_engine(tiny_hf, "vllm")
    with pytest.raises(CodeaccelError, match="needs a GGUF"):
        load_engine(tiny_hf, "llama.cpp")


# ---- token trees -------------------------------------------------------------------------------
def _tree(engine):
    """prefix, then the tree  a -> (b -> d, c), with e a second root: 5 nodes, 3 branches."""
    prefix = engine.tokenize("def add(a, b):\n    return")
    a, b, c, d, e = engine.tokenize(" a + b * c - d")[:5]
    return prefix, [a, b, c, d, e], [-1, 0, 0, 1, -1]


def test_tree_rows_equal_branch_by_branch_evaluation(engine):
    prefix, tokens, parents = _tree(engine)
    engine.reset()
    engine.prefill(prefix)
    tree_logits = engine.eval_tree(tokens, parents)  # [5, vocab]
    engine.rewind(len(prefix))  # drops the pending tree
    for branch in ([0, 1, 3], [0, 2], [4]):
        chain = engine.eval([tokens[i] for i in branch])
        np.testing.assert_allclose(tree_logits[branch], chain, atol=2e-3, rtol=1e-3)
        engine.rewind(len(prefix))


@pytest.mark.parametrize("path", [[0, 1, 3], [0, 2], [0], [4], []])
def test_keep_path_leaves_exactly_that_path_in_the_cache(engine, path):
    prefix, tokens, parents = _tree(engine)
    nxt = engine.tokenize(" x")[0]
    engine.reset()
    engine.prefill(prefix)
    engine.eval_tree(tokens, parents)
    engine.keep_path(path)
    assert engine.tokens == prefix + [tokens[i] for i in path]
    after = engine.eval([nxt])[0]
    engine.reset()
    fresh = engine.eval(prefix + [tokens[i] for i in path] + [nxt])[-1]
    # batch composition changes rounding (~3e-3 here); a wrong cache entry would move logits by O(1)
    np.testing.assert_allclose(after, fresh, atol=2e-2)


def test_tree_input_is_checked(engine):
    engine.reset()
    engine.prefill(engine.tokenize("x = 1"))
    with pytest.raises(CodeaccelError, match="parent must come before"):
        engine.eval_tree([5, 6], [1, -1])
    with pytest.raises(CodeaccelError, match="at most"):
        engine.eval_tree(list(range(5, 15)), [-1] * 10)
    engine.eval_tree([5, 6], [-1, 0])
    with pytest.raises(CodeaccelError, match="not a path"):
        engine.keep_path([1])
    with pytest.raises(RuntimeError, match="pending"):
        engine.eval([7])
    engine.keep_path([0, 1])
    assert engine.eval([7]).shape == (1, engine.n_vocab)


def test_scripted_engine_uses_the_sequential_tree_fallback(scripted):
    scripted.prefill([1])  # "a"
    logits = scripted.eval_tree([2, 3, 6], [-1, 0, -1])  # a -> b -> c ; a -> x
    assert list(logits.argmax(-1)) == [3, 4, 0]  # after b: c; after c: "\n"; after x: EOS
    scripted.keep_path([0, 1])
    assert scripted.tokens == [1, 2, 3]
