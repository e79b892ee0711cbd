"""The server's draft follows a folder of tuned versions (``codeaccel draft``): the live one is applied.

A thread looks the live version up every ``poll_s`` seconds; when it changed (a promotion, a
rollback), the new adapter is swapped in on the scheduler thread between two steps, so no
evaluation ever runs half on one draft and half on another. Requests in flight keep going:
their draft sequences' caches were made with the old adapter, which can only cost acceptance,
never correctness (every draft is verified by the target). A version that fails to load is
logged and the draft stays as it was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from codeaccel.personalization.versions import DraftVersions
from codeaccel.serve.metrics import ServerMetrics
from codeaccel.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


class DraftFollower:
    def __init__(self, versions: DraftVersions, apply: Callable[[Path | None], None], engine_kind: str,
                 scheduler: Scheduler, metrics: ServerMetrics, poll_s: float):  # fmt: skip
        """apply(adapter or None): sets the draft's adapter, in the form its ``engine_kind`` applies
        (``DraftVersion.adapter_for``: a GGUF file on llama.cpp, peft's folder on hf); called on the
        scheduler thread."""
        self.versions = versions
        self._apply = apply
        self.engine_kind = engine_kind
        self.scheduler = scheduler
        self.metrics = metrics
        self.poll_s = poll_s
        self.live: str | None = None  # the version the draft applies (None: the base model)
        self._asked: str | None = None  # the version last handed to the scheduler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codeaccel-draft-follow", daemon=True)

    def apply_now(self) -> None:
        """Apply the live version before serving starts (on the caller's thread)."""
        live = self.versions.live()
        if live is None:
            return
        self._asked = live.name  # not asked again: a version that fails stays failed until another is live
        try:
            self._apply(live.adapter_for(self.engine_kind))
        except Exception:
            log.exception("draft version %s could not be applied; serving with the base draft", live.name)
            return
        self.live = live.name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self) -> None:
        """One look at the registry; a change is queued for the scheduler thread."""
        try:
            live = self.versions.live()
        except (OSError, ValueError):
            log.exception("reading the draft versions in %s failed", self.versions.root)
            return
        name = live.name if live is not None else None
        if name == self._asked:
            return
        self._asked = name
        path = live.adapter_for(self.engine_kind) if live is not None else None

        def swap() -> None:
            try:
                self._apply(path)
            except Exception:
                log.exception("draft version %s could not be applied; the draft stays %s", name, self.live)
                return
            log.warning("draft switched from %s to %s", self.live or "base", name or "base")
            self.live = name
            self.metrics.draft_swaps.inc()

        self.scheduler.between_steps(swap)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()
