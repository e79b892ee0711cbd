"""Peers (the libraries' own speed-ups) run through the same method interface and stopping rules."""

import pytest

from codeaccel.autoregressive import generate
from codeaccel.engines import load_engine
from codeaccel.engines.pool import EnginePool
from codeaccel.errors import CodeaccelError
from codeaccel.generation import Request
from codeaccel.methods import MethodOptions, build_method
from codeaccel.sampling import SamplingParams

PROMPT = "def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n    return"


def test_llama_prompt_lookup_matches_greedy_autoregressive(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=512) as target, EnginePool() as pool:
        prompt = target.tokenize(PROMPT)
        ar = generate(target, prompt, SamplingParams(), 24, stop=["\n\n"])
        peer = build_method("prompt-lookup", target, MethodOptions(), pool)
        try:
            out = peer.generate(Request(prompt, SamplingParams(), 24, stop=["\n\n"]))
        finally:
            peer.close()
    assert out.tokens == ar.tokens and out.text == ar.text and out.finish_reason == ar.finish_reason
    assert peer.variant.startswith("llama-cpp-python") and peer.settings["num_pred_tokens"] == 10


@pytest.mark.parametrize("method", ["prompt-lookup", "hf-assisted"])
def test_transformers_generate_peers_match_greedy_autoregressive(tiny_hf, method):
    with load_engine(tiny_hf, "hf", n_ctx=512, dtype="float32") as target, EnginePool() as pool:
        prompt = target.tokenize(PROMPT)
        ar = generate(target, prompt, SamplingParams(), 24, stop=["\n\n"])
        peer = build_method(method, target, MethodOptions(draft_model=tiny_hf), pool)
        try:
            out = peer.generate(Request(prompt, SamplingParams(), 24, stop=["\n\n"]))
        finally:
            peer.close()
    assert out.tokens == ar.tokens and out.finish_reason == ar.finish_reason
    assert out.prefill_s > 0 and out.decode_s > 0


def test_hf_assisted_needs_the_hf_engine(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=512) as target, EnginePool() as pool:
        with pytest.raises(CodeaccelError, match="--engine hf"):
            build_method("hf-assisted", target, MethodOptions(draft_model=tiny_gguf), pool)
