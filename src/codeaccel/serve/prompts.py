"""Prompts as token ids: plain text, fill-in-the-middle, llama.cpp's repository-level infill, chat.

Fill-in-the-middle uses the model's own FIM tokens (Qwen2.5-Coder: ``<|fim_prefix|>``,
``<|fim_suffix|>``, ``<|fim_middle|>``; repository context with ``<|repo_name|>`` and
``<|file_sep|>``), in llama-server's layout for ``/infill``::

    <|repo_name|>myproject\n<|file_sep|>{filename}\n{text} ... <|file_sep|>filename\n
    <|fim_prefix|>{prefix}{prompt}<|fim_suffix|>{suffix}<|fim_middle|>

A raw FIM prompt written by the client works as any prompt (special-token markup is
parsed). When a prompt does not fit ``budget`` tokens, the extra files go first (oldest
first), then the suffix's tail, then the prefix's head, as llama-server trims.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

from codeaccel.engines.base import Engine
from codeaccel.errors import UserError

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"
PROJECT = "myproject"  # llama-server's repository name
CURRENT_FILE = "filename"  # llama-server's name of the file being edited


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    repo_name: int | None
    file_sep: int | None


def special_token(engine: Engine, markup: str) -> int | None:
    """The id of ``markup`` if the model has it as one token, else None."""
    ids = engine.tokenize(markup)
    return ids[0] if len(ids) == 1 else None


def fim_tokens(engine: Engine) -> FimTokens:
    """The model's FIM tokens; a model without them cannot fill in the middle (a 400, not a guess)."""
    pre, suf, mid = (special_token(engine, m) for m in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    if pre is None or suf is None or mid is None:
        raise UserError(f"model {engine.model_name} has no fill-in-the-middle tokens: suffix and /infill need them")
    return FimTokens(pre, suf, mid, special_token(engine, REPO_NAME), special_token(engine, FILE_SEP))


def fim_prompt(
    engine: Engine,
    prefix: str,
    suffix: str,
    budget: int,
    extra: Sequence[tuple[str, str]] = (),
    prompt: str = "",
    repo_head: bool = False,
    special: bool = True,
) -> list[int]:
    """Token ids of a FIM prompt of at most ``budget`` tokens; ``extra``: (filename, text) of other files.

    ``repo_head``: start with the repository header even without extra files, as llama-server's
    ``/infill`` always does for a model with repository tokens (so both servers see one prompt).
    ``special``: parse special-token markup in the texts (False: as llama-server's ``/infill``, a
    file that contains ``<|fim_middle|>`` is code, not a control token).
    """
    fim = fim_tokens(engine)

    def tok(text: str) -> list[int]:
        return engine.tokenize(text, special=special)

    before = tok(prefix + prompt) if prefix + prompt else []
    after = tok(suffix) if suffix else []
    fixed = 3  # the three FIM tokens
    if budget < fixed + 1:
        raise UserError(f"no room for a fill-in-the-middle prompt in {budget} tokens")
    head = _head(fim, tok, extra, repo_head, budget - fixed - len(before) - len(after))
    over = len(head) + len(before) + len(after) + fixed - budget
    if over > 0:  # drop the extra files' oldest tokens first
        cut = min(over, len(head))
        head = head[cut:]
        over -= cut
    if over > 0:  # then the suffix's tail, down to a quarter of the room
        keep = max(len(after) - over, min(len(after), (budget - fixed) // 4))
        over -= len(after) - keep
        after = after[:keep]
    if over > 0:  # then the prefix's head
        before = before[over:]
    return [*head, fim.prefix, *before, fim.suffix, *after, fim.middle]


def _head(fim: FimTokens, tok: Callable[[str], list[int]], extra: Sequence[tuple[str, str]], repo_head: bool,
          room: int) -> list[int]:  # fmt: skip
    """The repository context before the prefix, at most its last ``room`` tokens: the oldest files are
    dropped first, so it is tokenized from the newest file back, and no further than ``room`` reaches
    (a request with thousands of extra files costs what fits, not seconds of tokenizing)."""
    if room <= 0:
        return []
    if (extra or repo_head) and fim.repo_name is not None and fim.file_sep is not None:
        closing = [[fim.file_sep, *tok(CURRENT_FILE + "\n")]]
        files = ([fim.file_sep, *tok(filename + "\n"), *tok(text)] for filename, text in reversed(extra))
        opening = [[fim.repo_name, *tok(PROJECT + "\n")]]
    elif extra:  # no repository tokens: the files as plain text before the prefix
        closing, opening = [], []
        files = (tok(f"# {filename}\n{text}\n\n") for filename, text in reversed(extra))
    else:
        return []
    kept: list[list[int]] = []
    n = 0
    for piece in chain(closing, files, opening):  # newest first
        if n >= room:
            break
        kept.append(piece)
        n += len(piece)
    head = [t for piece in reversed(kept) for t in piece]
    return head[len(head) - room :] if len(head) > room else head


def chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's prompt; a template that refuses the messages (roles out of order) is a 400."""
    try:
        text = engine.apply_chat_template(messages)
    except UserError:
        raise
    except Exception as exc:  # jinja2's TemplateError from the template's raise_exception, and the like
        raise UserError(f"the model's chat template refused these messages: {exc}") from None
    return engine.tokenize(text)
