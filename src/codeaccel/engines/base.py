"""The engine contract: what every decoding method needs from a model.

An engine holds one sequence in its KV cache. It can

* ``eval(tokens)``: append tokens to the cache and return the logits at every new
  position, ``logits  # [len(tokens), n_vocab]`` (row i predicts the token after
  ``tokens[i]``);
* ``rewind(n)``: keep only the first n cached tokens (the one rewind primitive that
  speculative decoding uses to drop rejected draft tokens);
* tokenize / detokenize, render a chat, and report its vocabulary and the tokens
  that end generation;
* ``eval_tree(tokens, parents)`` / ``keep_path(path)``: evaluate several draft
  branches in one call (a token tree after the cache) and keep one of them. Engines
  without native support fall back to evaluating each branch in turn (correct,
  not fast); llama.cpp uses one sequence per branch, hf a tree attention mask.

Subclasses implement ``_forward`` and ``_truncate``; the base class keeps the
token history and checks inputs at the boundary, so the hot path stays small.

An engine holds one sequence, so it serves one request at a time: a call from a
second thread while another is inside the engine raises :class:`InternalError`
instead of corrupting the cache (the server's several sequences will come from a
multi-sequence evaluation, not from sharing one engine).
"""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Sequence

import numpy as np

from codeaccel.errors import InternalError


def _exclusive(method: Callable) -> Callable:
    """Run ``method`` holding the engine's lock; another thread inside the engine is a bug, not a wait."""

    @functools.wraps(method)
    def guarded(self: Engine, *args, **kwargs):
        if not self._in_use.acquire(blocking=False):
            raise InternalError(f"engine {self.model_name} is in use by another thread: one request at a time")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_use.release()

    return guarded


class Engine(abc.ABC):
    #: short engine name used on the command line ("llama.cpp", "hf")
    kind: str = ""
    #: weights' dtype where the engine has a choice (hf), else None
    dtype: str | None = None

    #: most leaves a token tree may have (branches verified at once)
    max_tree_branches: int = 8
    #: the LoRA adapter the engine applies (set_lora, where an engine has it), else None
    lora_path = None

    def __init__(self, model_name: str, n_vocab: int, n_ctx: int, eog_token_ids: frozenset[int]):
        self.model_name = model_name
        self.n_vocab = n_vocab  # width of a logits row
        self.n_ctx = n_ctx  # most tokens the cache can hold
        self.eog_token_ids = eog_token_ids  # tokens that end generation (EOS, end-of-turn)
        self._tokens: list[int] = []  # what the KV cache holds, in order
        self._tree: tuple[list[int], list[int]] | None = None  # an evaluated tree awaiting keep_path
        self._in_use = threading.RLock()  # held by the thread inside eval/rewind/...: reentrant for prefill

    # ---- the contract -------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """A copy of the token ids currently in the cache."""
        return list(self._tokens)

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @_exclusive
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens to the cache; return logits  # [len(tokens), n_vocab] float32."""
        return self._append(tokens, all_logits=True)

    def _append(self, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if self._tree is not None:
            raise RuntimeError("a token tree is pending: call keep_path or rewind first")
        if not tokens:
            raise InternalError("eval needs at least one token")
        if len(self._tokens) + len(tokens) > self.n_ctx:
            raise InternalError(
                f"context overflow: {len(self._tokens)} cached + {len(tokens)} new tokens > n_ctx={self.n_ctx}"
            )
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InternalError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        logits = self._forward(tokens, all_logits)
        self._tokens.extend(tokens)
        return logits

    @_exclusive
    def rewind(self, n_tokens: int) -> None:
        """Keep only the first n_tokens cached tokens (a pending token tree is dropped)."""
        if not 0 <= n_tokens <= len(self._tokens):
            raise InternalError(f"cannot rewind to {n_tokens} tokens: the cache holds {len(self._tokens)}")
        if self._tree is not None:
            self._drop_tree(n_branches=len(leaves(self._tree[1])))
            self._tree = None
        if n_tokens < len(self._tokens):
            self._truncate(n_tokens)
            del self._tokens[n_tokens:]

    # ---- token trees ---------------------------------------------------------------
    @_exclusive
    def eval_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """Evaluate a tree of tokens after the cache in one call; logits  # [n, vocab].

        Node i continues node ``parents[i]`` (-1: the last cached token); every parent
        comes before its children. Row i predicts the token after node i on its own
        branch. The tree stays pending until ``keep_path`` (or ``rewind``).
        """
        tokens, parents = [int(t) for t in tokens], [int(p) for p in parents]
        if self._tree is not None:
            raise RuntimeError("a token tree is already pending")
        if not tokens or len(parents) != len(tokens):
            raise InternalError("a token tree needs one parent per token, and at least one token")
        if any(not -1 <= p < i for i, p in enumerate(parents)):
            raise InternalError("every parent must come before its child")
        n_leaves = len(leaves(parents))
        if n_leaves > self.max_tree_branches:
            raise InternalError(f"a token tree may have at most {self.max_tree_branches} branches, got {n_leaves}")
        depth = _depths(parents)
        if len(self._tokens) + max(depth) + 1 > self.n_ctx:
            raise InternalError("context overflow: the token tree does not fit")
        logits = self._forward_tree(tokens, parents, depth)
        self._tree = (tokens, parents)
        return logits

    @_exclusive
    def keep_path(self, path: Sequence[int]) -> None:
        """Keep the pending tree's nodes ``path`` (a chain from a root, in order) in the cache."""
        if self._tree is None:
            raise RuntimeError("no token tree is pending")
        tokens, parents = self._tree
        path = [int(i) for i in path]
        if any(parents[node] != (path[j - 1] if j else -1) for j, node in enumerate(path)):
            raise InternalError(f"{path} is not a path from a root of the tree")
        self._keep_path(tokens, parents, path)
        self._tree = None
        self._tokens.extend(tokens[i] for i in path)

    def _forward_tree(self, tokens: list[int], parents: list[int], depth: list[int]) -> np.ndarray:
        """Fallback: evaluate each root-to-leaf branch as a chain, then rewind (subclasses do better)."""
        n_past = len(self._tokens)
        out = np.empty((len(tokens), self.n_vocab), np.float32)  # [n, vocab]
        done = [False] * len(tokens)
        for leaf in leaves(parents):
            branch = path_to(parents, leaf)
            rows = self._forward([tokens[i] for i in branch], all_logits=True)
            for node, row in zip(branch, rows):
                if not done[node]:
                    out[node], done[node] = row, True
            self._truncate(n_past)
        return out

    def _keep_path(self, tokens: list[int], parents: list[int], path: list[int]) -> None:
        if path:  # the fallback left nothing in the cache: evaluate the kept path
            self._forward([tokens[i] for i in path], all_logits=False)

    def _drop_tree(self, n_branches: int) -> None:
        """Remove a pending tree's cache entries (the fallback left none)."""

    def reset(self) -> None:
        self.rewind(0)

    @_exclusive
    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly ``tokens``, reusing the longest cached prefix.

        Returns the logits  # [vocab] for the position after the last token. At least
        the last token is always evaluated, so its logits are fresh.
        """
        tokens = list(tokens)
        if not tokens:
            raise InternalError("the prompt is empty: nothing to condition on")
        common = common_prefix_len(self._tokens, tokens[:-1])  # the last token is always evaluated
        self.rewind(common)
        return self._append(tokens[common:], all_logits=False)[-1]

    @abc.abstractmethod
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Text to token ids; special-token markup (e.g. ``<|im_start|>``) is parsed unless ``special``
        is False (a user's code that merely contains such text). No BOS is added."""

    @abc.abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text (special tokens rendered as text)."""

    def token_bytes(self, token: int) -> bytes | None:
        """A token's bytes, where :meth:`detokenize` is its tokens' bytes joined and decoded as UTF-8 with
        replacement, so a text grows token by token without decoding it whole again; None where it is not."""
        return None

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's own template, ending with the assistant's turn opener."""

    def close(self) -> None:
        """Free the model (optional)."""

    # ---- for subclasses -----------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        """Run the model on tokens appended after the cache.

        Returns logits  # [len(tokens), n_vocab] when all_logits, else  # [1, n_vocab] (last position).
        """

    @abc.abstractmethod
    def _truncate(self, n_tokens: int) -> None:
        """Drop cached positions >= n_tokens."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leaves(parents: Sequence[int]) -> list[int]:
    """The nodes of a token tree that no node continues, in order: one per branch."""
    return sorted(set(range(len(parents))) - set(parents))


def _depths(parents: Sequence[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from a root down to ``node``, in order."""
    out = [node]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (what a cache holding ``a`` can keep for ``b``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
