"""Versions of the tuned draft: each tuning's adapter kept in its own folder, one of them live.

``versions.json`` in the registry's folder names the live version and the ones promoted before
it (``rollback`` returns to the previous one; the base model when none is left), and each
version's record: when it was made, from which accepted completions, how long it trained, and
the acceptance measured against the live draft when it was validated. Writes are atomic (a new
file renamed over the old one) under an exclusive file lock, so a server reading the live
version while a tuning promotes one never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from codeaccel.errors import UserError
from codeaccel.models.registry import cache_dir, resolve_model

_VERSION_NAME = re.compile(r"v[0-9]+")
_ANY = object()  # promote(): whatever is live


class LiveChanged(UserError):
    """The live draft is not the one a candidate was validated against (promoted or rolled back meanwhile)."""


def default_versions_dir(draft_model: str) -> Path:
    """Where a draft model's tuned versions live by default: one folder per base draft."""
    return cache_dir() / "drafts" / resolve_model(draft_model).name


@dataclass(frozen=True)
class DraftVersion:
    name: str  # v1, v2, ...
    path: Path  # its folder: adapter/ (peft) and adapter.gguf (llama.cpp)
    record: dict

    @property
    def gguf(self) -> Path:
        return self.path / "adapter.gguf"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def adapter_for(self, engine_kind: str) -> Path:
        """The form an engine of ``engine_kind`` applies: peft's folder on hf, the GGUF file on llama.cpp."""
        return self.adapter_dir if engine_kind == "hf" else self.gguf


class DraftVersions:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._file = self.root / "versions.json"

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """The registry, read under an exclusive lock and written back atomically."""
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            yield state
            tmp = self._file.with_suffix(".tmp")
            with open(tmp, "w") as out:
                out.write(json.dumps(state, indent=1))
                out.flush()
                os.fsync(out.fileno())  # on disk before it replaces the registry
            os.replace(tmp, self._file)

    def _read(self) -> dict:
        """The registry; a file that is not one (not JSON, another shape) is a :class:`UserError` naming it."""
        if not self._file.is_file():
            return {"live": None, "history": [], "versions": {}}
        try:
            state = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"the versions registry {self._file} is not JSON ({exc}): repair it") from None
        problem = _shape_problem(state)
        if problem:
            raise UserError(f"the versions registry {self._file} is not one: {problem}; repair it")
        return state

    def _version(self, state: dict, name: str) -> DraftVersion:
        return DraftVersion(name, self.root / name, state["versions"][name])

    # ---- reading ---------------------------------------------------------------------
    def list(self) -> list[DraftVersion]:
        """Every version, oldest first; one still marked training while no tuning runs is shown
        ``interrupted`` (its process was killed before it could record a failure)."""
        with self._tuning_probe() as running:  # held while reading: a tuning cannot finish in between
            state = self._read()
        versions = [self._version(state, n) for n in sorted(state["versions"], key=lambda n: int(n[1:]))]
        if running:
            return versions
        return [DraftVersion(v.name, v.path, {**v.record, "status": "interrupted"})
                if v.record.get("status") == "training" else v for v in versions]  # fmt: skip

    def live(self) -> DraftVersion | None:
        state = self._read()
        return None if state["live"] is None else self._version(state, state["live"])

    def last_trained_id(self) -> int:
        """The newest accepted completion any version was trained on (0: none)."""
        return max((v.record.get("last_accepted_id", 0) for v in self.list()), default=0)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Held while a tuning of this folder runs (across processes): a second one is refused, not queued.
        (A reader's probe holds the lock shared for an instant: that is waited out, for a second at most.)"""
        with open(self.root / "train.lock", "w") as lock:
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UserError(f"a tuning of {self.root} is already running") from None
                    time.sleep(0.05)
            yield

    def tuning_running(self) -> bool:
        """Whether a tuning of this folder holds :meth:`training` now (in any process, this one included)."""
        with self._tuning_probe() as running:
            return running

    @contextmanager
    def _tuning_probe(self) -> Iterator[bool]:
        """Whether a tuning runs; while it does not, the train lock is held shared until the block ends
        (read-only: a registry a reader cannot write is probed all the same; no lock file, no tuning)."""
        try:
            fd = os.open(self.root / "train.lock", os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                yield True
                return
            yield False
        finally:
            os.close(fd)  # releases the shared lock

    # ---- writing ---------------------------------------------------------------------
    def create(self) -> DraftVersion:
        """A new, empty version folder (not live)."""
        with self._locked() as state:
            # numbered past every folder too: one left by a crash before its record was written
            taken = [int(v[1:]) for v in state["versions"]] + [int(p.name[1:]) for p in self.root.glob("v*")
                                                               if p.name[1:].isdigit()]  # fmt: skip
            name = f"v{1 + max(taken, default=0)}"
            (self.root / name).mkdir()
            state["versions"][name] = {"created_at": time.time(), "status": "training"}
            return self._version(state, name)

    def record(self, name: str, **fields) -> None:
        with self._locked() as state:
            self._known(state, name)
            state["versions"][name].update(fields)

    def fail(self, name: str, reason: str) -> None:
        """Mark a version whose tuning failed, and remove what it wrote (its record stays, with the reason)."""
        with self._locked() as state:
            self._known(state, name)
            state["versions"][name].update(status="failed", error=reason, failed_at=time.time())
        shutil.rmtree(self.root / name, ignore_errors=True)

    def promote(self, name: str, expected_live: object = _ANY) -> DraftVersion:
        """Make ``name`` the live draft (the one before it is kept for rollback); a version whose tuning
        failed or never finished is refused (its adapter may be half written). ``expected_live``: the live
        version's name (None: the base model) the candidate was validated against; :class:`LiveChanged`
        where another is live now (checked under the registry's lock: a ``draft promote`` or ``rollback``
        run during a tuning is never silently replaced by a candidate never compared with it)."""
        with self._locked() as state:
            self._known(state, name)
            if expected_live is not _ANY and state["live"] != expected_live:
                was, now = expected_live or "the base model", state["live"] or "the base model"
                raise LiveChanged(f"draft version {name} was validated against {was}, but {now} is live now: "
                                  "validate it again")  # fmt: skip
            status = state["versions"][name].get("status")
            if status in ("training", "failed"):
                raise UserError(f"draft version {name} is {status if status == 'failed' else 'not validated'}: "
                                "only a tuned and validated version can be promoted")  # fmt: skip
            if not (self.root / name / "adapter.gguf").is_file():
                raise UserError(f"draft version {name} has no adapter (its tuning did not finish)")
            if state["live"] is not None and state["live"] != name:
                state["history"].append(state["live"])
                state["versions"][state["live"]]["status"] = "superseded"
            state["live"] = name
            state["versions"][name]["status"] = "live"
            state["versions"][name]["promoted_at"] = time.time()
            return self._version(state, name)

    def rollback(self) -> DraftVersion | None:
        """Back to the version live before the current one (None: the base model)."""
        with self._locked() as state:
            if state["live"] is None:
                raise UserError("no tuned draft is live: nothing to roll back")
            state["versions"][state["live"]]["status"] = "rolled back"
            state["live"] = state["history"].pop() if state["history"] else None
            if state["live"] is None:
                return None
            state["versions"][state["live"]]["status"] = "live"  # no longer superseded
            return self._version(state, state["live"])

    @staticmethod
    def _known(state: dict, name: str) -> None:
        if name not in state["versions"]:
            known = ", ".join(sorted(state["versions"])) or "none"
            raise UserError(f"no draft version {name!r} (versions: {known})")


def _shape_problem(state: object) -> str | None:
    """What makes a ``versions.json`` value other than a registry (None: nothing)."""
    if not isinstance(state, dict):
        return "not a JSON object"
    versions = state.get("versions")
    if not isinstance(versions, dict):
        return '"versions" is not an object'
    for name, record in versions.items():
        if not _VERSION_NAME.fullmatch(name) or not isinstance(record, dict):
            return f"version {name!r} is not v<number> with a record object"
        if not isinstance(record.get("last_accepted_id", 0), int):
            return f"version {name!r} has a last_accepted_id that is not a number"
    if "live" not in state:
        return '"live" is missing'
    live = state["live"]
    if live is not None and (not isinstance(live, str) or live not in versions):
        return '"live" names no version'
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(n, str) and n in versions for n in history):
        return '"history" is not a list of versions'
    return None
