"""The method contract, and the two methods built on our own decode loops.

A method is anything with ``name``, ``settings``, ``variant`` and
``generate(Request) -> Generation``. It owns what its requests share on purpose
(for speculative methods: the drafter and the :class:`LearnedCosts`); each call of
``generate`` keeps what it learns in objects of its own.
"""

from __future__ import annotations

from typing import Protocol

from codeaccel.decoding.autoregressive import generate as autoregressive_generate
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.drafter import Drafter
from codeaccel.decoding.generation import Generation, Request
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.engines.base import Engine


class Method(Protocol):
    """``name`` is the method; ``settings`` what distinguishes two runs of it (draft model, k policy, ...),
    stored with every record; ``variant`` a short label of the settings for tables. A request's
    ``exclude_files`` names datastore files it must not draft from (a benchmark's own answer);
    methods without datastores ignore it."""

    name: str
    settings: dict
    variant: str

    def generate(self, request: Request) -> Generation: ...

    def close(self) -> None: ...


FINGERPRINTS = ("datastore_content", "draft_vocab_ids")  # settings that tell contents apart: not for labels


def variant_label(settings: dict) -> str:
    """A short label of a method's settings: ``qwen2.5-coder-0.5b-instruct on llama.cpp, k=4``."""
    parts = []
    if "draft_model" in settings:
        parts.append(f"{settings['draft_model']} on {settings['draft_engine']}")
    if settings.get("draft_k", "auto") != "auto":
        parts.append(f"k={settings['draft_k']}")
    parts += [  # a switch that is on is named alone ("context")
        k if v is True else f"{k}={v}"
        for k, v in settings.items()
        if k not in ("draft_model", "draft_engine", "draft_k", "draft_dtype", *FINGERPRINTS)
    ]
    return ", ".join(parts)


class AutoregressiveMethod:
    """The ``autoregressive`` method: one target evaluation per token."""

    name = "autoregressive"
    variant = ""

    def __init__(self, target: Engine):
        self.target = target
        self.settings: dict = {}  # its own: a caller adding to one method's settings never changes another's

    def generate(self, request: Request) -> Generation:
        r = request
        return autoregressive_generate(self.target, r.prompt_tokens, r.params, r.max_tokens, r.stop)

    def close(self) -> None:
        pass  # the harness owns the target engine


class SpeculativeMethod:
    """Target engine + drafter + draft-length policy, and the costs its requests learn together.

    costs: shared by every request of this method (default: new ones from the policy's curve).
    """

    def __init__(
        self,
        name: str,
        target: Engine,
        drafter: Drafter,
        draft_length: DraftLength,
        settings: dict | None = None,
        costs: LearnedCosts | None = None,
    ):
        self.name = name
        self.target = target
        self.drafter = drafter
        self.draft_length = draft_length
        self.costs = costs if costs is not None else LearnedCosts(draft_length.curve)
        self.settings = settings or {}
        self.variant = variant_label(self.settings)

    def generate(self, request: Request) -> Generation:
        r = request
        return speculative_generate(
            self.target,
            self.drafter,
            self.draft_length,
            r.prompt_tokens,
            r.params,
            r.max_tokens,
            r.stop,
            r.exclude_files,
            costs=self.costs,
            prediction=r.prediction_tokens,
        )

    def close(self) -> None:
        self.drafter.close()
