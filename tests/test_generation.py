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


class _BytesEngine:
    """Tokens that are byte strings (UTF-8 characters cut anywhere, invalid bytes too), as llama.cpp's are."""

    eog_token_ids = frozenset({0})

    def __init__(self, pieces):
        self.pieces = pieces
        self.whole_decodes = 0

    def token_bytes(self, token):
        return self.pieces[token]

    def detokenize(self, tokens):
        self.whole_decodes += 1
        return b"".join(self.pieces[t] for t in tokens).decode("utf-8", errors="replace")


def test_text_grown_token_by_token_is_the_whole_decoding_at_every_token():
    import random

    from codeaccel.decoding.generation import StopChecker

    rng = random.Random(0)
    raw = "def f(ü):\n    return '✓ 𝄞 日本'  # é\n".encode() + b"\xff\xfe" + "ok".encode()
    pieces = [b""]  # token 0: EOS
    for _ in range(40):  # cut the bytes at random places: multi-byte characters split across tokens
        cuts = sorted(rng.sample(range(1, len(raw)), 6))
        pieces += [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    engine = _BytesEngine(pieces)
    for start in range(1, len(pieces), 7):
        tokens = list(range(start, min(start + 7, len(pieces)))) * 3
        checker = StopChecker(engine, ["\x00never"], max_tokens=1000)
        for i, token in enumerate(tokens):
            checker.push(token)
            assert checker.text == engine.detokenize(tokens[: i + 1])
    grown = StopChecker(engine, ["return '✓"], max_tokens=1000)  # a stop string across split characters
    for token in range(1, 8):
        if grown.push(token):
            break
    assert grown.finish_reason == "stop" and grown.text == "def f(ü):\n    "
    engine.whole_decodes = 0
    StopChecker(engine, [], max_tokens=10).push(3)
    assert engine.whole_decodes == 0  # grown from the token's bytes, never decoded whole
