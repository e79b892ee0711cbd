"""Peers (the libraries' own speed-ups) run through the same method interface and stopping rules."""

import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.engines.pool import EnginePool
from codeaccel.errors import CodeaccelError
from codeaccel.methods.registry import MethodOptions, build_method

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


def test_llama_prompt_lookup_runs_past_one_batch_of_tokens(tiny_gguf):
    """llama-cpp-python sizes its logits buffer by n_batch (512) unless logits_all=True: longer runs must work."""
    with load_engine(tiny_gguf, n_ctx=1024) as target, EnginePool() as pool:
        prompt = target.tokenize(PROMPT * 40)[:600]  # prompt + draft rows past 512
        ar = generate(target, prompt, SamplingParams(), 40)
        peer = build_method("prompt-lookup", target, MethodOptions(), pool)
        try:
            out = peer.generate(Request(prompt, SamplingParams(), 40))  # raised ValueError (broadcast) before
        finally:
            peer.close()
    assert len(prompt) == 600 and out.n_generated > 0
    assert (out.tokens, out.finish_reason) == (ar.tokens, ar.finish_reason)


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


def test_hf_assisted_runs_its_assistant_on_hf_whatever_the_draft_engine(tiny_hf):
    """--draft-engine llama.cpp is for codeaccel's drafters; transformers needs a transformers assistant."""
    with load_engine(tiny_hf, "hf", n_ctx=512, dtype="float32") as target, EnginePool() as pool:
        peer = build_method("hf-assisted", target, MethodOptions(draft_model=tiny_hf, draft_engine="llama.cpp"), pool)
    assert peer.settings["draft_engine"] == "hf" and peer.assistant.kind == "hf"


def test_hf_assisted_needs_the_hf_engine(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=512) as target, EnginePool() as pool:
        with pytest.raises(CodeaccelError, match="--engine hf"):
            build_method("hf-assisted", target, MethodOptions(draft_model=tiny_gguf), pool)


def test_prompt_clock_times_only_each_models_first_call():
    """transformers fuses prefill into its first draft-and-verify round: only first calls count as prefill."""
    import time

    import torch

    from codeaccel.peers.hf_generate import _PromptClock

    class Slow(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    target, assistant = Slow(0.05), Slow(0.02)
    with _PromptClock(target, assistant) as clock:
        for model in (assistant, target, assistant, target, target):
            model(torch.zeros(1))
    assert 0.07 <= clock.prefill_s < 0.14  # all five calls would be 0.19 s
    assert not target._forward_hooks and not target._forward_pre_hooks  # removed on exit


def test_prompt_clock_counts_a_model_passed_twice_once():
    """A target that is also its own assistant reads the prompt once: its first call is not counted twice."""
    import time

    import torch

    from codeaccel.peers.hf_generate import _PromptClock

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    model = Slow()
    with _PromptClock(model, model) as clock:
        model(torch.zeros(1))
        model(torch.zeros(1))
    assert 0.05 <= clock.prefill_s < 0.09  # counted twice it would be >= 0.10 s
