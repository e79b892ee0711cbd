"""Long texts cut where tokenizing the pieces gives the tokens of the whole text.

llama.cpp finds special-token markup (``<|fim_prefix|>``) in a text by copying the rest of
the text at every occurrence it finds, so a long text full of markup tokenizes in quadratic
time: 64 KB of ``<|fim_prefix|>ab`` took 0.15 s, 4 MB (a body the server accepts) minutes.
Every occurrence of markup becomes a fragment of its own and the text between two is
tokenized alone, so a cut just after an occurrence changes no token, provided llama.cpp
would match that very occurrence in the whole text: no other occurrence of any markup
overlaps it (llama.cpp matches the longest markups first, each left to right), and it does
not strip the whitespace after it (``rstrip``). Pieces of at least :data:`PIECE_CHARS`
characters make tokenizing linear in the text's length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PIECE_CHARS = 16_384  # 16 KB of markup-dense text tokenizes in ~10 ms


@dataclass(frozen=True)
class Markup:
    """The special tokens' texts that a tokenizer parses in one mode (``special`` on or off)."""

    texts: tuple[str, ...]  # every text the tokenizer matches as one token
    cuttable: frozenset[str]  # those after which a cut is safe (no rstrip)

    def __post_init__(self) -> None:
        if any(not t for t in self.texts):
            raise ValueError("a markup text is empty")
        if not self.cuttable <= set(self.texts):
            raise ValueError("a cuttable markup is not among the markup texts")


def split_at_markup(text: str, markup: Markup, piece_chars: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at least ``piece_chars`` characters (the last may be shorter), each
    cut just after an occurrence of markup that is matched the same way in the whole text."""
    if piece_chars < 1:
        raise ValueError(f"piece_chars must be positive, got {piece_chars}")
    if len(text) <= piece_chars or not markup.cuttable:
        return [text]
    finder = re.compile("|".join(re.escape(t) for t in sorted(markup.cuttable, key=len, reverse=True)))
    pieces: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        cut = _next_cut(text, start + piece_chars, finder, markup.texts)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _next_cut(text: str, pos: int, finder: re.Pattern[str], texts: Sequence[str]) -> int | None:
    """The end of the first occurrence of cuttable markup at or after ``pos`` that no occurrence of
    any markup overlaps (None: there is none, or it ends the text)."""
    while (found := finder.search(text, pos)) is not None:
        begin, end = found.span()
        if end < len(text) and not _overlapped(text, begin, end, texts):
            return end
        pos = begin + 1
    return None


def _overlapped(text: str, begin: int, end: int, texts: Sequence[str]) -> bool:
    """Whether an occurrence of any of ``texts`` other than ``text[begin:end]`` itself overlaps it."""
    for other in texts:
        at = text.find(other, max(0, begin - len(other) + 1), end + len(other) - 1)
        while at != -1 and at < end:
            if at != begin or len(other) != end - begin:
                return True
            at = text.find(other, at + 1, end + len(other) - 1)
    return False
