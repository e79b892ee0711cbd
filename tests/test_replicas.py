"""Replicas on Ray Serve: the plan's arithmetic, and two replicas of the tiny model on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import tiny_models
from codeaccel.decoding.autoregressive import generate as autoregressive_generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.errors import UserError
from codeaccel.serve.app import REPLICA_HEADER
from codeaccel.serve.replicas import replica_plan
from live_server import pin_flat_cost_curve

RAY_PROBE = "import ray; ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20); ray.shutdown()"
PROMPTS = ["def add(a, b):\n", "import json\n\ndef load(path):\n", "class Stack:\n    def push(", "for i in range("]


def test_replica_plan_splits_the_cores_and_refuses_overcommitment():
    assert replica_plan(2, None, cpus=2) == 1.0
    assert replica_plan(1, None, cpus=2) == 2.0
    assert replica_plan(2, None, cpus=5) == 2.0  # whole CPUs each, the odd one left free


def test_replica_plan_refusals():
    with pytest.raises(UserError, match="need 3"):
        replica_plan(3, None, cpus=2)  # one CPU each is the least, and 3 > 2
    with pytest.raises(UserError, match="at least 1"):
        replica_plan(0, None, cpus=2)
    with pytest.raises(UserError, match="positive"):
        replica_plan(2, 0.0, cpus=2)
    with pytest.raises(UserError, match="need 4"):
        replica_plan(2, 2.0, cpus=2)
    assert replica_plan(2, 0.5, cpus=2) == 0.5


def test_cli_refuses_replicas_without_a_fixed_port_and_cpus_without_replicas():
    base = [sys.executable, "-m", "codeaccel", "serve", "--model", "nothing.gguf"]
    for extra, message in ((["--replicas", "2", "--port", "0"], "fixed --port"),
                           (["--cpus-per-replica", "1"], "needs --replicas")):  # fmt: skip
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_on_ray_serve_answer_like_one_server(tmp_path, monkeypatch):
    """`codeaccel serve --replicas 2`: Ray's proxy spreads concurrent requests over both copies
    (each names itself in a header) and every greedy answer equals decoding alone."""
    pytest.importorskip("ray.serve")
    probe = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})  # fmt: skip
    if probe.returncode != 0:  # the environment, not the product: Ray itself cannot start on this machine
        pytest.skip(f"Ray cannot start here: {probe.stderr.strip().splitlines()[-1:]}")
    gguf = str(tiny_models.build_gguf_model(tmp_path / "tiny-fim.gguf", fim=True))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(cache))
    pin_flat_cost_curve("tiny-fim")  # the context drafts plan on a fixed curve (both replicas read it)
    port = _free_port()
    command = [sys.executable, "-m", "codeaccel", "serve", "--replicas", "2", "--cpus-per-replica", "1",
               "--model", gguf, "--port", str(port), "--parallel", "2", "--ctx-size", "512",
               "--events-db", str(tmp_path / "events.sqlite")]  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        healthy = 0
        while healthy < 6:  # several answers in a row: both replicas loaded
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                healthy = healthy + 1 if httpx.get(url + "/health", timeout=5).status_code == 200 else 0
            except httpx.HTTPError:
                healthy = 0
            time.sleep(0.5)

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def complete(prompt: str):
            raw = client.completions.with_raw_response.create(model="tiny-fim", prompt=prompt, max_tokens=16,
                                                              temperature=0)  # fmt: skip
            return raw.headers.get(REPLICA_HEADER), raw.parse().choices[0].text

        prompts = PROMPTS * 4
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(complete, prompts))
        engine = load_engine(gguf, n_ctx=512)
        try:
            expected = {p: autoregressive_generate(engine, engine.tokenize(p), SamplingParams(), 16).text
                        for p in PROMPTS}  # fmt: skip
        finally:
            engine.close()
        assert [text for _, text in answers] == [expected[p] for p in prompts]
        assert len({replica for replica, _ in answers} - {None}) == 2
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever Ray left behind in the session
        except ProcessLookupError:
            pass
        log.close()
