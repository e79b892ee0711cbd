"""The flags several commands share, the method settings built from them, and the command line as typed."""

from __future__ import annotations

import functools
import inspect
import json
import math
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer

from codeaccel.engines import ENGINES
from codeaccel.engines.hf import DTYPES
from codeaccel.errors import UserError
from codeaccel.methods.registry import MethodOptions
from codeaccel.models.registry import ALIASES, BUNDLED, resolve_model

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
    Optional[str],
    typer.Option(help="Retrieval parts to switch off, comma-separated: multi-source,timing,cache,tree,context."),
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


def comma_list(spec: str, flag: str) -> tuple[str, ...]:
    """The items of a comma-separated flag, stripped; refused when one is empty or named twice."""
    items = tuple(item.strip() for item in spec.split(","))
    if not all(items):
        raise UserError(f"{flag} has an empty item (comma-separated, none empty), got {spec!r}")
    twice = sorted({item for item in items if items.count(item) > 1})
    if twice:
        raise UserError(f"{flag} names {twice[0]!r} twice, got {spec!r}")
    return items


def positive_ints(spec: str, flag: str) -> tuple[int, ...]:
    """The integers >= 1 of a comma-separated flag (none empty, none twice)."""
    items = comma_list(spec, flag)
    try:
        values = tuple(int(v) for v in items)
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {spec!r}") from None
    if any(v < 1 for v in values) or len(set(values)) < len(values):
        raise UserError(f"{flag} needs distinct integers >= 1, got {spec!r}")
    return values


def read_stdin_text() -> str:
    """Standard input as UTF-8 text; other bytes are a one-line error, not a traceback."""
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("stdin is not UTF-8 text") from None


def read_text_file(path: Path, what: str = "the file") -> str:
    """A file's UTF-8 text; a missing, unreadable or non-text file is a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except PermissionError:
        raise UserError(f"{what} {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


def check_finite(value: float, flag: str) -> float:
    """A float flag that must be a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be a finite number > 0, got {value}")
    return value


def check_model(spec: str) -> str:
    """A model refused at once where it names no bundled model, file or directory (nothing is assembled or loaded)."""
    if ALIASES.get(spec, spec) not in BUNDLED:
        resolve_model(spec)  # a path: raises UserError where there is no model
    return spec


def check_engine(engine: str, flag: str = "--engine") -> str:
    if engine not in ENGINES:
        raise UserError(f"{flag}: unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def check_folder(path: Path | None, flag: str = "--out") -> Path | None:
    """A folder to write into, refused before any work where a file is in its place (or in a parent's)."""
    if path is None:
        return None
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    return path


def check_datastores(paths: list[Path] | tuple[Path, ...]) -> None:
    """--datastore directories, each refused at once where it is missing (before any model loads)."""
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"no datastore at {path}: build one with `codeaccel index build`")


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(path: Path, what: str) -> Path:
    """An SQLite file to open or create: refused where a folder is in its place or the file is no SQLite database."""
    check_folder(path.parent, what)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not an SQLite file")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise UserError(f"cannot read {what} {path}: {exc}") from None
        if head and head != SQLITE_HEADER:
            raise UserError(f"{what} {path} is not an SQLite database")
    return path


def check_json_file(path: Path, what: str) -> None:
    """A JSON file a command reads: refused where it exists but cannot be read as JSON."""
    if not path.exists():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what} {path} is unreadable or not JSON ({exc}): repair or remove it") from None


def check_url(url: str, flag: str) -> str:
    """An http(s) URL, refused at once where it cannot be one."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UserError(f"{flag} {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"{flag} must be an http:// or https:// URL, got {url!r}")
    return url


def method_options(
    draft_model: str | None,
    draft_engine: str | None,
    draft_k: int | None,
    draft_vocab: int | None,
    datastore: list[Path] | None,
    ablate: str | None,
) -> MethodOptions:
    """The method settings shared by ``generate`` and ``bench`` (validated by MethodOptions), and the
    models, engine and datastores they name checked before any model loads."""
    if draft_model is not None:
        check_model(draft_model)
    if draft_engine is not None:
        check_engine(draft_engine, "--draft-engine")
    check_datastores(datastore or [])
    return MethodOptions(
        draft_model=draft_model,
        draft_engine=draft_engine,
        draft_k=draft_k,
        draft_vocab=draft_vocab,
        datastores=tuple(str(d) for d in datastore or ()),
        ablate=comma_list(ablate, "--ablate") if ablate is not None else (),
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
