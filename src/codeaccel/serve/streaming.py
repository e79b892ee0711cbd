"""What a stream may send of a completion so far: never text a stop string could still cut,
never half a UTF-8 character (a token can end inside one: the detokenized text then ends in U+FFFD)."""

from __future__ import annotations

from collections.abc import Sequence


def safe_prefix(text: str, stops: Sequence[str]) -> str:
    """``text`` minus a tail that could be the start of a stop string or of an unfinished character."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):  # the longest tail that is a proper prefix of stop
            if text[end - n : end] == stop[:n]:
                held = max(held, n)
                break
    return text[: end - held]


class StreamCursor:
    """The text sent of one choice so far; ``advance`` gives what may be sent next."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.sent = ""

    def advance(self, text: str, final: bool = False) -> str:
        ready = text if final else safe_prefix(text, self.stops)
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        delta = ready[len(self.sent) :]
        self.sent = ready
        return delta
