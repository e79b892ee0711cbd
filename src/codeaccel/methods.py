"""The decoding methods the benchmark and the CLI can run, by name.

A method is anything with ``name`` and
``generate(prompt_tokens, params, max_tokens, stop) -> Generation``. Each one is
built from the loaded target engine plus :class:`MethodOptions`; a new method is
one entry in :data:`BUILDERS`, and the harness needs no change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from codeaccel.autoregressive import AutoregressiveMethod
from codeaccel.engines.base import Engine
from codeaccel.errors import CodeaccelError
from codeaccel.generation import Generation
from codeaccel.sampling import SamplingParams


class Method(Protocol):
    name: str

    def generate(
        self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int, stop: Sequence[str] = ()
    ) -> Generation: ...


@dataclass(frozen=True)
class MethodOptions:
    """Settings some methods need beyond the target engine (drafters add theirs here)."""

    draft_model: str | None = None


BUILDERS: dict[str, Callable[[Engine, MethodOptions], Method]] = {
    "autoregressive": lambda target, options: AutoregressiveMethod(target),
}


def parse_methods(spec: str) -> list[str]:
    """``"autoregressive,speculative"`` → a checked list of method names."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise CodeaccelError("no method given")
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        raise CodeaccelError(f"unknown method {unknown[0]!r}: choose from {', '.join(BUILDERS)}")
    return list(dict.fromkeys(names))


def build_method(name: str, target: Engine, options: MethodOptions | None = None) -> Method:
    if name not in BUILDERS:
        raise CodeaccelError(f"unknown method {name!r}: choose from {', '.join(BUILDERS)}")
    return BUILDERS[name](target, options or MethodOptions())
