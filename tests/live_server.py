"""A completion server on loopback for tests: started in a thread, ready when /health is 200."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import uvicorn

from codeaccel.engines.cost_curve import CostCurve, save_cost_curve
from codeaccel.serve.app import create_app
from codeaccel.serve.settings import ServeSettings


class LiveServer:
    def __init__(self, settings: ServeSettings):
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not (self.server.started and self.server.servers):
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while httpx.get(self.url + "/health").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError(httpx.get(self.url + "/health").text)
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def pin_flat_cost_curve(model: str) -> None:
    """This machine's cost curve for ``model``, pinned: verification as cheap as a step up to 8 tokens.

    The drafts' lengths follow the curve; a first-use profile of a tiny model on a busy machine is
    noise (measured here: C(13) = 14 steps, C(14) = 3.2), so tests of the drafts plan on a fixed one.
    """
    relative = [1.0 if k <= 8 else 1.0 + 0.25 * (k - 8) for k in range(1, 33)]
    save_cost_curve(CostCurve(model, "llama.cpp", None, 0, 1, list(range(1, 33)), [0.001] * 32, relative))
