"""The autoregressive loop and its stopping rules, on a scripted engine."""

import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.errors import CodeaccelError

GREEDY = SamplingParams()


def test_max_tokens_ends_with_length(scripted):
    gen = generate(scripted, [1], GREEDY, max_tokens=4)
    assert gen.tokens == [2, 3, 4, 5]
    assert gen.text == "bc\nEND"
    assert gen.finish_reason == "length"


def test_eos_ends_generation_and_is_not_in_text(scripted):
    gen = generate(scripted, [6], GREEDY, max_tokens=10)  # "x" -> EOS
    assert gen.tokens == [0]
    assert gen.text == ""
    assert gen.finish_reason == "eos"


def test_stop_string_cuts_text_at_its_start(scripted):
    gen = generate(scripted, [1], GREEDY, max_tokens=20, stop=["\nEN"])
    # tokens: b c \n END; the text contains "\nEN" once END arrives
    assert gen.tokens == [2, 3, 4, 5]
    assert gen.text == "bc"
    assert gen.finish_reason == "stop"


def test_earliest_stop_string_wins(scripted):
    gen = generate(scripted, [1], GREEDY, max_tokens=20, stop=["END", "c"])
    assert gen.text == "b"
    assert gen.tokens == [2, 3]


def test_stop_string_spanning_tokens(scripted):
    gen = generate(scripted, [1], GREEDY, max_tokens=20, stop=["c\nE"])
    assert gen.text == "b"
    assert gen.tokens == [2, 3, 4, 5]


def test_context_limit_caps_generation(scripted):
    scripted.n_ctx = 5
    gen = generate(scripted, [1, 2], GREEDY, max_tokens=100)
    assert gen.n_generated == 3
    assert gen.finish_reason == "length"


def test_prefill_reuses_cached_prefix(scripted):
    generate(scripted, [1, 2, 3], GREEDY, max_tokens=1)
    scripted.forward_calls.clear()
    generate(scripted, [1, 2, 3, 4, 5], GREEDY, max_tokens=1)
    # the cache held [1, 2, 3]; only the new tokens are evaluated
    assert scripted.forward_calls[0] == [4, 5]


def test_prefill_reevaluates_last_token_of_identical_prompt(scripted):
    generate(scripted, [1, 2], GREEDY, max_tokens=1)
    scripted.forward_calls.clear()
    generate(scripted, [1, 2], GREEDY, max_tokens=1)
    assert scripted.forward_calls[0] == [2]


@pytest.mark.parametrize("prompt,max_tokens", [([], 5), ([1], 0)])
def test_bad_requests_are_refused(scripted, prompt, max_tokens):
    with pytest.raises(CodeaccelError):
        generate(scripted, prompt, GREEDY, max_tokens=max_tokens)


def test_prompt_longer_than_context_is_refused(scripted):
    with pytest.raises(CodeaccelError, match="context"):
        generate(scripted, [1] * 64, GREEDY, max_tokens=5)


def test_timings_are_recorded(scripted):
    gen = generate(scripted, [1], GREEDY, max_tokens=3)
    assert gen.prefill_s > 0 and gen.decode_s > 0
    assert gen.n_prompt_tokens == 1
    assert gen.tokens_per_s == pytest.approx(3 / gen.decode_s)
