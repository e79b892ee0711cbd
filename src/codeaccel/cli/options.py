"""The flags several commands share, the method settings built from them, and the command line as typed."""

from __future__ import annotations

import functools
import inspect
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.methods.registry import MethodOptions

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled model name, GGUF file or HF directory.")]
EngineOpt = Annotated[str, typer.Option("--engine", "-e", help="llama.cpp or hf.")]
DtypeOpt = Annotated[str, typer.Option(help="hf engine weights: bfloat16 or float32.")]
# one completion's settings (codeaccel generate, codeaccel client)
MaxTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Sampling seed.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")]
ChatOpt = Annotated[bool, typer.Option("--chat/--raw", help="Wrap the prompt in the model's chat template.")]
MethodOpt = Annotated[
    str, typer.Option(help="Decoding method: autoregressive, speculative, speculative-client-draft, prompt-lookup, …")
]
DraftModelOpt = Annotated[
    Optional[str], typer.Option(help="Draft model for speculative methods (default: the bundled 0.5B).")
]
DraftEngineOpt = Annotated[
    Optional[str],
    typer.Option(help="Engine of the draft model (default: the target's); hf-assisted's assistant always runs on hf."),
]
DatastoreOpt = Annotated[
    Optional[list[Path]], typer.Option("--datastore", help="Datastore for retrieval (repeatable; default: general).")
]
AblateOpt = Annotated[
    Optional[str], typer.Option(help="Retrieval parts to switch off, comma-separated: multi-source,timing,cache,tree.")
]
DraftVocabOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Keep only this many of the draft model's output tokens, the most frequent in the general "
        "datastore (FR-Spec; lossless; llama.cpp)."
    ),
]
DraftKOpt = Annotated[
    Optional[int], typer.Option(help="Fixed draft length (default: chosen per step from the cost curve).")
]


def command_line() -> str:
    """The command as the user typed it, as ``codeaccel …`` (recorded in results files)."""
    return shlex.join(["codeaccel", *sys.argv[1:]])


def method_options(
    draft_model: str | None,
    draft_engine: str | None,
    draft_k: int | None,
    draft_vocab: int | None,
    datastore: list[Path] | None,
    ablate: str | None,
) -> MethodOptions:
    """The method settings shared by ``generate`` and ``bench`` (validated by MethodOptions)."""
    return MethodOptions(
        draft_model=draft_model,
        draft_engine=draft_engine,
        draft_k=draft_k,
        draft_vocab=draft_vocab,
        datastores=tuple(str(d) for d in datastore or ()),
        ablate=tuple(a.strip() for a in (ablate or "").split(",") if a.strip()),
    )


# the flags that become a command's MethodOptions: (name, option type), in the order --help lists them
METHOD_FLAGS = (
    ("draft_model", DraftModelOpt),
    ("draft_engine", DraftEngineOpt),
    ("draft_k", DraftKOpt),
    ("draft_vocab", DraftVocabOpt),
    ("datastore", DatastoreOpt),
    ("ablate", AblateOpt),
)


def with_method_flags(command: Callable) -> Callable:
    """Give a command the method flags (declared once, here); it receives them as one ``options: MethodOptions``.

    The command's own signature has ``options`` as its last parameter; typer sees the
    flags of :data:`METHOD_FLAGS` in its place.
    """
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)  # the flags' typer.Option metadata, resolved
    own = [p.replace(annotation=hints[name]) for name, p in signature.parameters.items() if name != "options"]
    flags = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in METHOD_FLAGS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name, _ in METHOD_FLAGS}
        return command(**kwargs, options=method_options(**values))

    wrapper.__signature__ = signature.replace(parameters=[*own, *flags])
    wrapper.__annotations__ = {
        **{k: v for k, v in command.__annotations__.items() if k != "options"},
        **dict(METHOD_FLAGS),
    }
    return wrapper
