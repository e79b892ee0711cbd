"""The server killed -9 while clients send ``/v1/events``: no acknowledged event is lost.

An event is acknowledged (200 with its id) only once its transaction is committed; the whole server
process, uvicorn and all, gets SIGKILL in the middle of concurrent writes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from codeaccel.serve.events import EventStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_of_the_server_during_event_writes_loses_no_acknowledged_event(tmp_path, tiny_gguf):
    port = _free_port()
    events_db = tmp_path / "events.sqlite"
    command = [sys.executable, "-m", "codeaccel", "serve", "--model", tiny_gguf, "--method", "autoregressive",
               "--port", str(port), "--parallel", "1", "--ctx-size", "256", "--events-db", str(events_db)]  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/events"
    acknowledged: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = client.post(url, json={"type": "view", "completion_id": f"cmpl-{worker}-{i}"})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acknowledged.append(r.json()["id"])
                i += 1

    try:
        deadline = time.time() + 120
        while True:  # up: the event route answers while the model may still load
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.post(url, json={"type": "view", "completion_id": "probe"}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        workers = [threading.Thread(target=send, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        while len(acknowledged) < 200 and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)  # mid-write: four clients never pause
        server.wait()
        stop.set()
        for w in workers:
            w.join()
    finally:
        stop.set()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert len(acknowledged) >= 200
    stored = {e["id"] for e in EventStore(events_db).events()}
    assert set(acknowledged) <= stored
