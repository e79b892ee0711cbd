"""Request bodies of every endpoint, validated at the boundary (pydantic); unknown fields are ignored,
as OpenAI's and llama.cpp's servers ignore options they do not implement, and a null option is its default.
Types are strict, as OpenAI's API checks them: ``"stream": "yes"``, ``"max_tokens": "5"`` or a token id
sent as ``true`` is a 400 naming the field, not a guess (an integer for a float is fine; JSON object keys,
always strings, are read as the token ids they name). A known option this server cannot honour (``logprobs``
asked for, a ``suffix`` beside token ids, ``echo`` with ``stream``) is a 400, never silently dropped.

Sampling defaults follow each API: the OpenAI endpoints OpenAI's (temperature 1, top-p 1),
llama.cpp's native ones llama-server's (temperature 0.8, top-k 40, top-p 0.95).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """An option sent as null takes its default (OpenAI's API; clients such as Continue send nulls)."""
        if not isinstance(data, dict):
            return data
        _check_text(data)
        return {k: v for k, v in data.items() if v is not None}


MAX_STOPS = 16  # OpenAI allows 4; llama.cpp's clients send a handful (Continue: 9 for Qwen)
MAX_STOP_CHARS = 512  # every stop string is searched for in every step's new text


def _stops(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_stops(value):
    stops = _stops(value)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
    return value


def _check_text(value, where: str = "body") -> None:
    """Strings must be encodable text: JSON lets a lone surrogate (\\ud800) through, UTF-8 does not.

    A walk with its own stack, not recursion: JSON nested as deep as the parser allows (an ignored
    field of ~1000 nested lists) would otherwise raise RecursionError, a 500."""
    pending = [(value, where)]
    while pending:
        item, name = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{name} is not valid Unicode text (a lone surrogate)") from None
        elif isinstance(item, dict):
            for key in item:  # a key is text too; named in the message by ascii(): encodable whatever it holds
                pending_key = str(key)
                try:
                    pending_key.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"the key {ascii(pending_key)} in {name} is not valid Unicode text") from None
            pending.extend(reversed([(v, ascii(str(k))[1:-1]) for k, v in item.items()]))  # in document order
        elif isinstance(item, list):
            pending.extend((v, name) for v in reversed(item))


class StreamOptions(_Body):
    include_usage: bool = False


class Prediction(_Body):
    """OpenAI's predicted output: text the completion is expected to repeat (drafts are read from it)."""

    type: Literal["content"] = "content"
    content: str


class _OpenAISampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension (vLLM, llama.cpp): 0 keeps every token
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    prediction: Prediction | None = None

    @property
    def stops(self) -> list[str]:
        return _stops(self.stop)

    _stop_limits = field_validator("stop")(classmethod(lambda cls, v: _check_stops(v)))


class CompletionRequest(_OpenAISampling):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of texts (one choice set each)."""

    prompt: str | list[str] | list[int]
    suffix: str | None = None  # fill-in-the-middle: the text after the gap
    echo: bool = False
    logprobs: int = Field(0, ge=0, le=0)  # asked for (> 0): a 400, not a silent null

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _options_it_can_honour(self):
        """Options that would be silently dropped are refused instead: the client learns at once."""
        token_ids = isinstance(self.prompt, list) and bool(self.prompt) and isinstance(self.prompt[0], int)
        if self.suffix is not None and token_ids:
            raise ValueError("suffix needs a text prompt (token ids are a prompt already built: put the FIM "
                             "tokens in them)")  # fmt: skip
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text (a list of parts: its text parts joined; other part types are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] = False  # asked for (true): a 400, not a silent null


class ExtraChunk(_Body):
    """llama.cpp's ``input_extra`` item: another file's text, put before the FIM prefix."""

    text: str
    filename: str = "tmp"


def _integral(value):
    """A whole number sent as a float (``128.0``) is that integer, as llama-server reads it; ``"5"`` is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


NativeInt = Annotated[int, BeforeValidator(_integral)]  # llama.cpp's native endpoints' integers


class _NativeSampling(_Body):
    n_predict: NativeInt = Field(-1, ge=-1)  # -1: until the context is full (llama-server's default)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: NativeInt = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: NativeInt | None = Field(None, ge=-1)  # -1: random (llama-server's default)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    cache_prompt: bool = True  # start from a kept cache holding a prefix of the prompt (llama-server's default)

    _stop_limits = field_validator("stop")(classmethod(lambda cls, v: _check_stops(v)))


class NativeCompletionRequest(_NativeSampling):
    """llama-server's ``POST /completion``: ``prompt`` is text or token ids."""

    prompt: str | list[int]


class InfillRequest(_NativeSampling):
    """llama-server's ``POST /infill`` (llama.vim, llama.vscode; Continue's llama.cpp provider posts to /completion)."""

    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # text after the prefix, inside the gap (the current line's start)


class EventRequest(_Body):
    """``POST /v1/events``, Tabby's schema: what the user did with a completion."""

    type: Literal["view", "select", "dismiss"]
    completion_id: str = Field(min_length=1, max_length=200)
    choice_index: int = Field(0, ge=0, le=1024)
    view_id: str | None = None
    elapsed: int | None = Field(None, ge=0)  # milliseconds from view to select
    select_kind: Literal["line"] | None = None
    repository: str | None = Field(None, max_length=500)  # an extension: the project the completion was used in


MAX_VERIFY_DRAFT = 16  # draft tokens one verification takes (rejection sampling holds a [k, vocab] row each)
MAX_DRAFT_PROBS = 4096  # tokens with probability > 0 per position (a draft sampling with top-k / top-p)


class VerifyRequest(_Body):
    """``POST /v1/verify`` (codeaccel's own; SpeCoder's split): a client's draft, verified by the target.

    The context is ``context`` (token ids: the prompt and every token committed so far), or, with
    ``session_id``, what the server holds for that session (the last call's context and the tokens
    it returned) followed by ``append``. Greedy by default; sampling uses the draft's probabilities
    (``draft_probs``, one {token id: probability} per draft token) where given (rejection sampling),
    else sample-and-compare; both keep the target's distribution.
    """

    model: str | None = None
    session_id: str | None = Field(None, min_length=1, max_length=128)
    context: list[int] | None = None  # (re)starts the session where one is named
    append: list[int] = Field(default_factory=list)  # with session_id: tokens the client added
    draft: list[int] = Field(default_factory=list, max_length=MAX_VERIFY_DRAFT)
    draft_probs: list[dict[Annotated[int, Strict(False)], float]] | None = None  # JSON keys: token ids as text
    max_tokens: int | None = Field(None, ge=1)  # most tokens to return (default: the draft's length + 1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)  # with the context's length, seeds this call's sampler

    @model_validator(mode="after")
    def _consistent(self):
        if self.context is None and self.session_id is None:
            raise ValueError("give the context (token ids), or a session_id the server knows")
        if self.context is not None and not self.context:
            raise ValueError("context must not be empty")
        if self.draft_probs is not None:
            if len(self.draft_probs) != len(self.draft):
                raise ValueError(f"draft_probs has {len(self.draft_probs)} rows for {len(self.draft)} draft tokens")
            for i, (token, row) in enumerate(zip(self.draft, self.draft_probs)):
                if len(row) > MAX_DRAFT_PROBS:
                    raise ValueError(f"draft_probs[{i}] has {len(row)} entries; at most {MAX_DRAFT_PROBS}")
                if any(not 0.0 <= p <= 1.0 for p in row.values()) or abs(sum(row.values()) - 1.0) > 1e-3:
                    raise ValueError(f"draft_probs[{i}] is not a distribution (probabilities in [0, 1] summing to 1)")
                if row.get(token, 0.0) <= 0.0:
                    raise ValueError(f"draft_probs[{i}] gives the draft token {token} no probability")
        return self
