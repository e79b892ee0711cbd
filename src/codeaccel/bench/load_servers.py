"""The servers a load test compares, each started as its own process on loopback and stopped after.

* ``codeaccel-<method>``: ``codeaccel serve`` with that method (``autoregressive``,
  ``context``, ``retrieval``, ``draft-model`` with the bundled 0.5B), ``--parallel``
  sequences, draft lengths chosen for the whole batch;
  ``codeaccel-<method>-per-request`` sizes each request's draft as if it ran alone (the
  baseline of the joint choice);
* ``llama-server``: llama.cpp's own server (``make llama-tools``), ``-np`` slots, continuous
  batching, the same GGUF file;
* ``llama-server-draft``: the same with the bundled 0.5B as its draft model (``-md``).

Both get the same threads, the same context per slot and the same requests; a server is
ready when its ``GET /health`` answers 200.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from codeaccel.errors import SetupError, UserError
from codeaccel.models.registry import resolve_model
from codeaccel.peers.llama_cpp_tools import tool_path

SERVERS = ("codeaccel-autoregressive", "codeaccel-context", "codeaccel-context-per-request", "codeaccel-retrieval",
           "codeaccel-draft-model", "codeaccel-draft-model-per-request", "llama-server",
           "llama-server-draft")  # fmt: skip
PER_REQUEST = "-per-request"  # a codeaccel server whose drafts are sized each as if alone (not jointly)
DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    model: str
    parallel: int
    ctx_size: int  # tokens per sequence / slot
    threads: int
    prefix_cache: bool = True  # ours keeps finished requests' caches for later prompts sharing a prefix

    def command(self, port: int) -> list[str]:
        if self.name.startswith("codeaccel-"):  # no completion cache: levels repeat requests, all decoded
            method = self.name.removeprefix("codeaccel-").removesuffix(PER_REQUEST)
            lengths = "per-request" if self.name.endswith(PER_REQUEST) else "joint"
            return [sys.executable, "-m", "codeaccel", "serve", "--model", self.model, "--method", method,
                    "--draft-lengths", lengths, "--parallel", str(self.parallel), "--ctx-size", str(self.ctx_size),
                    "--port", str(port), "--threads", str(self.threads),
                    "--completion-cache", "0", *([] if self.prefix_cache else ["--no-prefix-cache"])]  # fmt: skip
        command = [str(tool_path("llama-server")), "-m", str(resolve_model(self.model).path), "--port", str(port),
                   "--host", "127.0.0.1", "-np", str(self.parallel), "-c", str(self.ctx_size * self.parallel),
                   "-t", str(self.threads), "-tb", str(self.threads), "--no-webui"]  # fmt: skip
        if self.name == "llama-server-draft":
            command += ["-md", str(resolve_model(DRAFT_MODEL).path), "-td", str(self.threads)]
        return command


def server_spec(name: str, model: str, parallel: int, ctx_size: int, threads: int | None = None,
                prefix_cache: bool = True) -> ServerSpec:  # fmt: skip
    if name not in SERVERS:
        raise UserError(f"unknown server {name!r}: choose from {', '.join(SERVERS)}")
    return ServerSpec(name, model, parallel, ctx_size, threads or os.cpu_count() or 1, prefix_cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched(spec: ServerSpec, log_path: Path, ready_timeout_s: float = 600.0) -> Iterator[str]:
    """Start ``spec`` on a free port; yield its URL once ``/health`` is 200; stop it after."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(spec.command(port), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + ready_timeout_s
            while True:
                if process.poll() is not None:
                    raise SetupError(
                        f"{spec.name} exited with {process.returncode} before it was ready (see {log_path})"
                    )
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise SetupError(f"{spec.name} was not ready in {ready_timeout_s:.0f} s (see {log_path})")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
