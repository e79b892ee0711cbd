"""Long texts tokenized in pieces cut after markup: the pieces give the whole text's tokens."""

import random

import pytest

from codeaccel.engines import load_engine
from codeaccel.engines.markup_split import PIECE_CHARS, Markup, split_at_markup

QWEN_LIKE = Markup(("<|a|>", "<|b|>"), frozenset({"<|a|>", "<|b|>"}))


def test_short_text_is_one_piece():
    assert split_at_markup("x<|a|>y", QWEN_LIKE, piece_chars=100) == ["x<|a|>y"]


def test_pieces_are_cut_just_after_markup_and_rejoin_to_the_text():
    text = "0123456789<|a|>abc<|b|>0123456789<|a|>tail"
    pieces = split_at_markup(text, QWEN_LIKE, piece_chars=5)
    assert "".join(pieces) == text
    assert pieces == ["0123456789<|a|>", "abc<|b|>0123456789<|a|>", "tail"]  # <|b|> starts too early
    assert all(len(p) >= 5 for p in pieces[:-1])


def test_no_cut_without_markup_or_at_the_very_end():
    assert split_at_markup("x" * 50, QWEN_LIKE, piece_chars=5) == ["x" * 50]
    assert split_at_markup("x" * 50 + "<|a|>", QWEN_LIKE, piece_chars=5) == ["x" * 50 + "<|a|>"]


def test_no_cut_after_an_occurrence_another_markup_overlaps():
    # "ab" and "bc" overlap in "abc": which one the tokenizer takes depends on its order, so neither is a cut
    markup = Markup(("ab", "bc"), frozenset({"ab", "bc"}))
    assert split_at_markup("xxxxxabcxxxxx", markup, piece_chars=3) == ["xxxxxabcxxxxx"]
    # a self-overlapping markup ("aa" in "aaa") is no cut either; the clean occurrence later is
    self_overlap = Markup(("aa",), frozenset({"aa"}))
    assert split_at_markup("xxxaaaxxaaxxxx", self_overlap, piece_chars=2) == ["xxxaaaxxaa", "xxxx"]


def test_no_cut_after_markup_that_strips_what_follows():
    markup = Markup(("<r>", "<|a|>"), frozenset({"<|a|>"}))  # <r> strips whitespace after it (rstrip)
    assert split_at_markup("xxxxx<r>  xxx<|a|> y", markup, piece_chars=3) == ["xxxxx<r>  xxx<|a|>", " y"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        split_at_markup("x", QWEN_LIKE, piece_chars=0)
    with pytest.raises(ValueError):
        Markup(("<|a|>",), frozenset({"<|b|>"}))
    with pytest.raises(ValueError):
        Markup(("",), frozenset())


@pytest.fixture(scope="module")
def engine(fim_gguf):
    eng = load_engine(fim_gguf, "llama.cpp", n_ctx=512)
    yield eng
    eng.close()


@pytest.mark.parametrize("special", [True, False])
def test_a_long_text_full_of_markup_tokenizes_as_a_whole(engine, special):
    rng = random.Random(0)
    units = ["<|fim_prefix|>", "<|im_end|>", "<|file_sep|>", "def f(x):\n", "    return x  ", "é✓", "\n\n", " "]
    text = "".join(rng.choice(units) for _ in range(4 * PIECE_CHARS // 6))
    assert len(text) > 2 * PIECE_CHARS
    pieces = split_at_markup(text, engine._markup(special))
    assert len(pieces) > 1 if special else len(pieces) == 1  # off, the tiny model parses no markup
    whole = engine.llm.tokenize(text.encode(), add_bos=False, special=special)
    assert engine.tokenize(text, special=special) == whole


def test_the_engine_parses_control_markup_only_with_special(engine):
    on, off = engine._markup(True), engine._markup(False)
    assert "<|fim_prefix|>" in on.texts and "<|im_end|>" in on.cuttable
    assert "<|fim_prefix|>" not in off.texts  # control tokens are text when special is off
