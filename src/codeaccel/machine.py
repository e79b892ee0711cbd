"""A description of the machine a measurement ran on (stored with every result)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "versions": {
            d: v
            for d in ("codeaccel", "llama-cpp-python", "torch", "transformers", "numpy")
            if (v := _version(d)) is not None
        },
    }


def provenance(command: str) -> dict:
    """The header of every results file: the command that produced it, this machine, and the UTC date."""
    return {
        "command": command,
        "machine": machine_info(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
