"""The request's own text as a retrieval source: its prompt and everything generated so far.

Code repeats itself first within the file being written: names, the signature,
earlier lines, the code an edit starts from. :class:`NgramIndex` indexes one token
sequence by its n-grams (n = ``min_n`` .. ``max_n``) as it grows: appending a token
adds ``max_n − min_n + 1`` keys (work bounded by max_n² per token, whatever the
sequence's length; no rebuild per step), and
a lookup tries the context's last ``max_n`` tokens, then shorter tails, and returns
what followed the longest tail that occurred earlier, most recent occurrence first
(llama.cpp's ``ngram-simple`` and transformers' prompt lookup search the same text;
here the result is one more :class:`~codeaccel.retrieval.datastore.Retrieved`, merged
into the same trie as the datastores' with its own weight).

Two per-request sources use it (:class:`LocalSources`):

* **context**: the prompt and every committed token (kind ``"context"``);
* **prediction**: an expected output given with the request (OpenAI's predicted
  outputs: an edit's original text), indexed once behind the prompt's last tokens, so
  that its first tokens are found right after the prompt (kind ``"prediction"``).

Worked example: context ``a b c d a b`` (``min_n`` 2): the tail ``a b`` occurred at
positions 0-1, followed by ``c d``; the draft continues ``c d a b``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import islice

from codeaccel.retrieval.datastore import Retrieved

CONTEXT_MIN_N, CONTEXT_MAX_N = 2, 16  # n-gram lengths indexed (a 1-token match predicts little)
MAX_OCCURRENCES = 8  # continuations read per lookup, most recent first
LOCAL_KINDS = ("context", "prediction")  # the kinds of retrieved continuations that come from the request itself
RECENCY_BONUS = 0.25  # the most recent occurrence counts 1.25, the next 1.125, ...: ties go to the latest


class NgramIndex:
    """An append-only token sequence indexed by its n-grams: ``extend`` adds max_n − min_n + 1 keys per token.

    ``starts`` (optional): tokens that precede the sequence, indexed as its left edge
    (a prediction is indexed behind the prompt's tail) but never returned as continuations.
    """

    def __init__(self, kind: str, min_n: int = CONTEXT_MIN_N, max_n: int = CONTEXT_MAX_N, starts: Sequence[int] = ()):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.kind = kind
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._first = 0  # continuations start at or after this position
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions right after each occurrence
        self.extend(starts)
        self._first = len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens) - self._first

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n :]), []).append(end)

    def lookup(self, tail: Sequence[int], cont_len: int) -> Retrieved | None:
        """What followed the longest suffix of ``tail`` found here (at most ``cont_len`` tokens each)."""
        if cont_len < 1:
            return None
        tail = list(tail[-self.max_n :])
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            ends = self._ends.get(tuple(tail[-n:]))
            if not ends:
                continue
            continuations: Counter = Counter()
            latest = (e for e in reversed(ends) if self._first <= e < len(self.tokens))
            usable = list(islice(latest, MAX_OCCURRENCES))  # the most recent only: bounded work per lookup
            for rank, end in enumerate(usable):
                continuations[tuple(self.tokens[end : end + cont_len])] += 1.0 + RECENCY_BONUS * 0.5**rank
            if continuations:
                return Retrieved(self.kind, self.kind, n, len(ends), continuations)
        return None


class LocalSources:
    """One request's own sources: its prediction (if any) and its growing context.

    ``update(context)`` indexes the committed tokens not yet indexed (the context only
    grows within a request); ``lookup`` searches the prediction, then the context.
    """

    def __init__(self, prompt: Sequence[int], prediction: Sequence[int] = (), use_context: bool = True):
        self.context = NgramIndex("context") if use_context else None
        self.prediction = NgramIndex("prediction", starts=prompt[-CONTEXT_MAX_N:]) if prediction else None
        if self.prediction is not None:
            self.prediction.extend(prediction)
        self._indexed = 0
        self.update(prompt)

    @property
    def searches(self) -> bool:
        """Whether there is anything to search (False: neither the context nor a prediction)."""
        return self.context is not None or self.prediction is not None

    def update(self, context: Sequence[int]) -> None:
        if self.context is not None and len(context) > self._indexed:
            self.context.extend(context[self._indexed :])
        self._indexed = len(context)

    def lookup(self, context: Sequence[int], cont_len: int) -> list[Retrieved]:
        self.update(context)
        found = [s.lookup(context, cont_len) for s in (self.prediction, self.context) if s is not None]
        return [r for r in found if r is not None]
