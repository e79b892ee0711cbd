"""The draft on the client, the target on the server (SpeCoder's split), on loopback with tiny models.

Contract: ``RemoteDraftClient`` gives exactly the target's greedy text alone, with any draft (its own
weights: every token accepted; other weights: often rejected), and the same text for the same seed
when sampling; the server keeps each session's context (later calls send only the draft); many
clients are verified in one continuous batch; the completion cache answers repeats without the
server; bad verification bodies are 4xx with an OpenAI-style error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.personalization.completion_cache import CachedCompletion, CacheKey, CompletionCache
from codeaccel.personalization.store import open_store
from codeaccel.remote.client import RemoteDraftClient
from codeaccel.serve.app import call_seed
from codeaccel.serve.settings import ServeSettings
from live_server import LiveServer

PROMPTS = ["def add(a, b):\n    return", "import json\n\nclass Decoder:", "    for i in range(", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    events = tmp_path_factory.mktemp("remote") / "events.sqlite"
    settings = ServeSettings(model=tiny_gguf, method="autoregressive", parallel=4, ctx_size=512, events_db=events)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def target(tiny_gguf):
    engine = load_engine(tiny_gguf, n_ctx=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=["same", "other"])
def draft(request, tiny_gguf, tiny_gguf_draft):
    engine = load_engine(tiny_gguf if request.param == "same" else tiny_gguf_draft, n_ctx=512)
    yield request.param, engine
    engine.close()


def _alone(target, prompt, n):
    target.reset()
    return generate(target, prompt, SamplingParams(), n).tokens


def test_greedy_text_is_the_targets_whatever_the_draft(server, target, draft):
    kind, engine = draft
    with RemoteDraftClient(engine, server.url, draft_tokens=4) as client:
        for text in PROMPTS[:2]:
            prompt = target.tokenize(text)
            got = client.generate(prompt, max_tokens=30)
            assert got.tokens == _alone(target, prompt, 30)
            s = got.stats
            assert s.calls >= 1 and s.committed_tokens == len(got.tokens)
            if kind == "same":  # the target's own weights: every draft token accepted (but what follows an EOS)
                assert s.drafted_tokens - 4 < s.accepted_tokens <= s.drafted_tokens
                assert s.calls <= -(-30 // 5) + 1


def test_seeded_sampling_is_reproducible_and_sends_the_draft_probabilities(server, target, draft):
    _, engine = draft
    params = SamplingParams(temperature=0.9, top_k=20, seed=11)
    prompt = target.tokenize(PROMPTS[2])
    with RemoteDraftClient(engine, server.url, draft_tokens=3) as client:
        first = client.generate(prompt, params, max_tokens=24)
        again = client.generate(prompt, params, max_tokens=24)
        other = client.generate(prompt, SamplingParams(temperature=0.9, top_k=20, seed=12), max_tokens=24)
    assert first.tokens == again.tokens
    assert other.tokens != first.tokens  # another seed, another sample (tiny model: 20 tokens to choose from)
    assert first.stats.probs_sent == first.stats.drafted_tokens > 0  # rejection sampling with q


def test_many_clients_are_verified_together_and_each_gets_its_own_text(server, target, tiny_gguf_draft):
    prompts = [target.tokenize(p) for p in PROMPTS]
    want = [_alone(target, p, 24) for p in prompts]

    def run(prompt):
        engine = load_engine(tiny_gguf_draft, n_ctx=512)  # a client each, as on separate machines
        try:
            with RemoteDraftClient(engine, server.url, draft_tokens=3) as client:
                return client.generate(prompt, max_tokens=24).tokens
        finally:
            engine.close()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, prompts)) == want


def test_the_completion_cache_answers_a_repeat_without_the_server(server, target, draft):
    _, engine = draft
    prompt = target.tokenize(PROMPTS[3])
    cache = CompletionCache(8)
    with RemoteDraftClient(engine, server.url, cache=cache) as client:
        first = client.generate(prompt, max_tokens=16)
        second = client.generate(prompt, max_tokens=16)
        unseeded = SamplingParams(temperature=0.8)
        client.generate(prompt, unseeded, max_tokens=4)
        client.generate(prompt, unseeded, max_tokens=4)
    assert second.tokens == first.tokens and second.stats.cache_hit and second.stats.calls == 0
    assert not first.stats.cache_hit
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)  # unseeded samples are never cached


def test_completion_cache_is_a_bounded_lru():
    cache = CompletionCache(2)
    keys = [CacheKey.of([i], SamplingParams(), 8) for i in range(3)]
    for key in keys[:2]:
        cache.put(key, CachedCompletion((1,), "a", "eos"))
    assert cache.get(keys[0]) is not None  # keys[0] is now the most recently used
    cache.put(keys[2], CachedCompletion((2,), "b", "eos"))
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert (cache.hits, cache.misses) == (3, 1)


def test_completion_cache_is_thread_safe():
    cache = CompletionCache(50)
    keys = [CacheKey.of([i], SamplingParams(), 8) for i in range(200)]

    def work(offset):
        for i in range(2000):
            key = keys[(i * 7 + offset) % 200]
            if cache.get(key) is None:
                cache.put(key, CachedCompletion((i,), "t", "length"))

    threads = [threading.Thread(target=work, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50 and cache.hits + cache.misses == 8000


def test_a_session_keeps_its_context_between_calls(server, target):
    prompt = target.tokenize(PROMPTS[0])
    want = _alone(target, prompt, 6)
    first = httpx.post(server.url + "/v1/verify", json={"session_id": "s1", "context": prompt, "draft": want[:2]})
    assert first.status_code == 200, first.text
    assert first.json()["tokens"] == want[:3] and first.json()["n_accepted"] == 2
    # only the draft now: the server appends the returned tokens to what it holds
    second = httpx.post(server.url + "/v1/verify", json={"session_id": "s1", "draft": want[3:5]})
    assert second.json()["tokens"] == want[3:6]
    assert second.json()["usage"]["prompt_tokens"] == len(prompt) + 3


@pytest.mark.parametrize(
    ("body", "status", "param_or_code"),
    [
        ({"draft": [1]}, 400, None),  # neither a context nor a session
        ({"session_id": "never-seen", "draft": [1]}, 404, "session_not_found"),
        ({"context": [1, 2], "draft": [10**9]}, 400, None),  # token id out of range
        ({"context": [1, 2], "draft": [3], "draft_probs": [{"4": 1.0}]}, 400, None),  # q(draft token) = 0
        ({"context": [1, 2], "draft": [3], "draft_probs": [{"3": 0.5}]}, 400, None),  # not a distribution
        ({"context": [1, 2], "draft": [3], "draft_probs": [{"3": 0.5, "999999": 0.5}]}, 400, None),  # no such token
        ({"context": [1, 2], "draft": [3, 4], "draft_probs": [{"3": 1.0}]}, 400, None),  # rows != tokens
        ({"context": [1, 2], "draft": list(range(65))}, 400, None),  # too long a draft
        ({"context": [1] * 600, "draft": [1]}, 400, "context_length_exceeded"),
        ({"context": [1, 2], "draft": [3], "model": "gpt-4"}, 404, "model_not_found"),
    ],
)
def test_bad_verifications_are_4xx_with_an_openai_error(server, body, status, param_or_code):
    response = httpx.post(server.url + "/v1/verify", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param_or_code is not None:
        assert error["code"] == param_or_code


def test_call_seeds_differ_by_position_and_are_reproducible():
    assert call_seed(7, 10) == call_seed(7, 10)
    assert len({call_seed(7, p) for p in range(100)} | {call_seed(8, 10)}) == 101


def test_a_selected_choice_becomes_an_accepted_completion(server, target):
    client = server.client()
    done = client.completions.create(model=None, prompt=PROMPTS[0], max_tokens=8, temperature=0, n=2)
    # recorded before the answer went out: a select right after finds it
    got = httpx.post(server.url + "/v1/events", json={"type": "select", "completion_id": done.id,
                                                      "choice_index": 1, "repository": "demo"})  # fmt: skip
    assert got.json()["accepted_id"] is not None
    again = httpx.post(server.url + "/v1/events", json={"type": "select", "completion_id": done.id, "choice_index": 1})
    assert again.json()["accepted_id"] == got.json()["accepted_id"]  # a retried event: one accepted completion
    unknown = httpx.post(server.url + "/v1/events", json={"type": "select", "completion_id": "cmpl-nope"})
    assert unknown.status_code == 200 and unknown.json()["accepted_id"] is None  # stored as an event only
    with open_store(server.app.state.codeaccel.settings.events_db) as store:
        [row] = [s for s in store.items() if s.item.completion_id == done.id]
    assert row.item.completion == done.choices[1].text and row.item.repository == "demo"
    assert row.item.prompt == PROMPTS[0] and row.item.source == "event"


def test_the_client_command_prints_the_targets_text(server, target, tiny_gguf_draft, tmp_path):
    prompt = PROMPTS[1]
    tokens = _alone(target, target.tokenize(prompt), 12)
    tokens = [t for t in tokens[: next((i for i, t in enumerate(tokens) if t in target.eog_token_ids), 12)]]
    want = target.detokenize(tokens)
    run = subprocess.run([sys.executable, "-m", "codeaccel", "client", prompt, "--raw", "--server", server.url,
                          "--draft-model", tiny_gguf_draft, "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    printable = lambda text: "".join(c for c in text if c.isprintable() or c == "\n").strip()  # noqa: E731
    assert printable(run.stdout) == printable(want) != ""
    assert "verifications" in run.stderr
    cached = tmp_path / "completions.json"
    for attempt in ("first", "again"):  # the second run answers from the file, without the server's target
        again = subprocess.run([sys.executable, "-m", "codeaccel", "client", prompt, "--raw", "--server", server.url,
                                "--draft-model", tiny_gguf_draft, "--max-tokens", "12", "--cache", str(cached)],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert printable(again.stdout) == printable(want)
        assert ("answered from the completion cache" in again.stderr) == (attempt == "again")


def test_a_client_cache_file_keeps_completions_for_the_model_that_wrote_them(tmp_path):
    from codeaccel.errors import UserError
    from codeaccel.personalization.completion_cache import (
        CachedCompletion,
        CacheKey,
        load_completions,
        save_completions,
    )

    path = tmp_path / "cache.json"
    cache = load_completions(path, 2, "target-a")  # no file yet: empty
    keys = [CacheKey.of([1, 2, i], SamplingParams(), 8, ("\n",)) for i in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, CachedCompletion((5, i), f"text {i}", "stop"))
    save_completions(cache, path, "target-a")
    back = load_completions(path, 2, "target-a")
    assert [k for k, _ in back.items()] == keys[1:]  # the capacity kept the two most recent, in order
    assert back.get(keys[2]) == CachedCompletion((5, 2), "text 2", "stop") and back.get(keys[0]) is None
    assert len(load_completions(path, 2, "target-b")) == 0  # another model's completions are not its
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a completion cache file"):
        load_completions(path, 2, "target-a")


# ---- hot swap of the tuned draft -----------------------------------------------------------------
def _adapter_versions(root, seeds=(1, 2)):
    """A versions folder with one random adapter per seed (v1, v2, ...), none live."""
    import numpy as np

    import tiny_models
    from codeaccel.personalization.lora_gguf import LoraWeights, write_gguf_lora
    from codeaccel.personalization.versions import DraftVersions

    versions = DraftVersions(root)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        v = versions.create()
        pairs = {(layer, "mlp.up_proj"): (rng.standard_normal((4, tiny_models.N_EMBD)).astype(np.float32),
                                          rng.standard_normal((tiny_models.N_FF, 4)).astype(np.float32))
                 for layer in range(tiny_models.N_LAYER)}  # fmt: skip
        write_gguf_lora(LoraWeights(pairs, 4.0), v.gguf, "llama", permute_qk=False)
        versions.record(v.name, status="validated")
    return versions


def test_the_server_swaps_its_draft_under_concurrent_requests(tiny_gguf, tiny_gguf_draft, target, tmp_path,
                                                               monkeypatch):  # fmt: skip
    from codeaccel.engines.cost_curve import CostCurve, save_cost_curve
    from live_server import pin_flat_cost_curve

    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    pin_flat_cost_curve("tiny")
    relative = [1.0 if k <= 8 else 1.0 + 0.25 * (k - 8) for k in range(1, 33)]  # the draft 10x faster: it drafts
    save_cost_curve(CostCurve("tiny-draft", "llama.cpp", None, 0, 1, list(range(1, 33)), [0.0001] * 32, relative))
    versions = _adapter_versions(tmp_path / "versions")
    versions.promote("v1")
    settings = ServeSettings(
        model=tiny_gguf,
        method="draft-model",
        draft_model=tiny_gguf_draft,
        parallel=4,
        ctx_size=512,
        events_db=tmp_path / "e.sqlite",
        draft_versions=tmp_path / "versions",
        draft_poll_s=0.02,
        completion_cache=0,
    )  # fmt: skip  (every request decoded while swapping)
    prompts = [target.tokenize(p) for p in PROMPTS] * 4
    want = [_alone(target, p, 24) for p in prompts]
    stop = threading.Event()

    def keep_swapping():
        while not stop.is_set():
            for action in (lambda: versions.promote("v2"), versions.rollback, versions.rollback,
                           lambda: versions.promote("v1")):  # fmt: skip
                action()
                time.sleep(0.03)

    with LiveServer(settings) as live:
        follower = live.app.state.codeaccel.runtime.follower
        assert follower.live == "v1"  # applied before serving
        swapper = threading.Thread(target=keep_swapping)
        swapper.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda p: httpx.post(live.url + "/v1/completions", timeout=120, json={
                    "prompt": p, "max_tokens": 24, "temperature": 0}), prompts))  # fmt: skip
        finally:
            stop.set()
            swapper.join()
        metrics = httpx.get(live.url + "/metrics").text
    assert [a.status_code for a in answers] == [200] * len(prompts)
    got = [a.json()["choices"][0]["text"] for a in answers]
    assert got == [target.detokenize(w[: next((i for i, t in enumerate(w) if t in target.eog_token_ids), len(w))])
                   for w in want]  # fmt: skip

    def metric(name):
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))

    assert metric("codeaccel_draft_swaps_total") >= 2
    assert metric("vllm:spec_decode_num_draft_tokens_total") > 0  # drafts were made, by changing drafts


def test_the_client_swaps_its_draft_between_generations(server, target, tiny_gguf_draft, tmp_path):
    versions = _adapter_versions(tmp_path / "versions")
    engine = load_engine(tiny_gguf_draft, n_ctx=512)
    prompt = target.tokenize(PROMPTS[0])
    want = _alone(target, prompt, 20)
    stop = threading.Event()
    with RemoteDraftClient(engine, server.url, draft_tokens=3) as client:
        swaps = []

        def keep_swapping():
            while not stop.is_set():
                client.set_draft_lora([versions.list()[0].gguf, versions.list()[1].gguf, None][len(swaps) % 3])
                swaps.append(engine.lora_path)

        swapper = threading.Thread(target=keep_swapping)
        swapper.start()
        try:
            got, deadline = [], time.time() + 120
            while (len(got) < 6 or len(swaps) < 4) and time.time() < deadline:
                got.append(client.generate(prompt, max_tokens=20).tokens)
        finally:
            stop.set()
            swapper.join()
    engine.close()
    assert got == [want] * len(got) and len(got) >= 6
    assert len(swaps) >= 4 and {s is None for s in swaps} == {True, False}  # adapters in and out meanwhile


def test_the_split_bench_measures_both_modes_on_loopback(tmp_path):
    """A server subprocess on the tiny FIM model, clients with the same weights as draft: every draft
    token accepted, every remote output equal to the server's own."""
    import tiny_models
    from codeaccel.remote.split_bench import SplitBenchConfig, run_split_bench, to_markdown

    fim = str(tiny_models.build_gguf_model(tmp_path / "tiny-fim.gguf", fim=True))
    config = SplitBenchConfig(target_model=fim, draft_model=fim, clients=(1, 2), requests=4, n_predict=12,
                              parallel=2, ctx_size=512, threads=1)  # fmt: skip
    doc = run_split_bench(config, tmp_path, lambda *_: None)
    rows = {(r["method"], r["clients"]): r for r in doc["rows"]}
    assert all({"dataset", "model", "engine", "n_problems", "tokens_per_s", "pass_at_1"} <= set(r) for r in doc["rows"])
    assert set(rows) == {(m, c) for m in ("server-alone", "remote-draft") for c in (1, 2)}
    for (mode, _), r in rows.items():
        assert r["errors"] == 0 and r["tokens_per_s"] > 0 and r["target_s_per_token"] > 0
        if mode == "remote-draft":
            assert r["identical"] == 4 and r["mean_accepted_len"] > 2  # the draft is the target: 5 a call at best
            # a session's context stays in the server's cache: after its first call only the draft is evaluated
            assert r["context_cached"] > 0.5 > rows[("server-alone", r["clients"])]["context_cached"]
    assert "| remote-draft | 2 |" in to_markdown(doc)


def test_the_server_answers_a_repeated_reproducible_request_from_its_cache(server, target):
    body = {"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0}

    def metric(name):
        text = httpx.get(server.url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    hits = metric("codeaccel_completion_cache_hits_total")
    first = httpx.post(server.url + "/v1/completions", json=body).json()
    again = httpx.post(server.url + "/v1/completions", json=body).json()
    streamed = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}).text
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["timings"]["predicted_ms"] == 0 and again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first["choices"][0]["text"] in "".join(
        json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"])  # fmt: skip
    assert metric("codeaccel_completion_cache_hits_total") == hits + 2
    unseeded = {**body, "temperature": 0.8}
    for _ in range(2):
        httpx.post(server.url + "/v1/completions", json=unseeded)
    assert metric("codeaccel_completion_cache_hits_total") == hits + 2  # a fresh sample is never a cached one


def test_sessions_end_expire_and_are_bounded():
    from codeaccel.serve.errors import APIError
    from codeaccel.serve.sessions import VerifySessions

    sessions = VerifySessions(max_sessions=2, ttl_s=0.05)
    with sessions.call("a", [1, 2], [3]) as context:
        assert context == [1, 2, 3]
        with pytest.raises(APIError) as busy:
            with sessions.call("a", None, []):
                pass
        assert busy.value.status == 409
        sessions.commit("a", context + [4])
    with sessions.call("a", None, [5]) as context:
        assert context == [1, 2, 3, 4, 5]
    assert sessions.end("a") and not sessions.end("a")
    with pytest.raises(APIError) as gone:
        with sessions.call("a", None, []):
            pass
    assert gone.value.status == 404
    for name in "bcd":
        sessions.commit(name, [1])
    assert len(sessions) == 2  # the least recently used one went
    time.sleep(0.1)
    sessions.commit("e", [1])
    assert len(sessions) == 1  # the idle ones expired


def test_a_client_ends_its_session_and_stops_at_the_servers_context(server, target, tiny_gguf_draft):
    engine = load_engine(tiny_gguf_draft, n_ctx=512)
    prompt = target.tokenize(PROMPTS[0])
    try:
        with RemoteDraftClient(engine, server.url, draft_tokens=4) as client:
            assert client.server_ctx == 512
            before = len(server.app.state.codeaccel.sessions)
            client.generate(prompt, max_tokens=8)
            assert len(server.app.state.codeaccel.sessions) == before  # ended, not left to expire
            client.server_ctx = len(prompt) + 6  # a server holding 6 more tokens: the text ends there
            short = client.generate(prompt, max_tokens=30)
    finally:
        engine.close()
    assert short.finish_reason in ("length", "eos") and len(prompt) + len(short.tokens) <= len(prompt) + 6
    assert short.tokens == _alone(target, prompt, 30)[: len(short.tokens)]


def test_a_draft_that_tokenizes_otherwise_than_the_servers_target_is_refused(server, target):
    from codeaccel.engines.tokenizer import engine_fingerprint
    from codeaccel.errors import UserError
    from codeaccel.remote.client import ServerInfo, server_info

    info = server_info(server.url)
    assert info.tokenizer_fingerprint == engine_fingerprint(target)  # published in /v1/models
    with pytest.raises(UserError, match="tokenizes text otherwise"):
        RemoteDraftClient(target, server.url, server=ServerInfo(info.model, info.max_model_len, "another"))
    RemoteDraftClient(target, server.url, server=ServerInfo(info.model, info.max_model_len, None)).close()  # unsaid


def test_a_server_that_is_not_codeaccel_is_one_setup_error(monkeypatch):
    from codeaccel.errors import SetupError
    from codeaccel.remote import client as remote_client

    for body in ({"object": "list", "data": []}, {"data": [{"id": "llama"}]}, ["not", "an", "object"]):
        monkeypatch.setattr(remote_client.httpx, "get", lambda *a, body=body, **kw: httpx.Response(200, json=body))
        with pytest.raises(SetupError, match="no codeaccel server"):
            remote_client.server_info("http://127.0.0.1:9")


def test_the_targets_end_of_text_ends_the_text_whatever_the_drafts_end_ids(target, monkeypatch):
    """The server says "eos" for its last token: the text ends there with "eos", the token's text not shown,
    even where that id is not one of the draft's own end-of-generation ids (another model's template)."""
    from codeaccel.remote.client import ServerInfo

    other_end = next(t for t in range(target.n_vocab) if t not in target.eog_token_ids and target.token_bytes(t))
    first = target.tokenize(" x")[0]
    answers = iter([{"tokens": [first], "finish_reason": None}, {"tokens": [first, other_end], "finish_reason": "eos"}])

    def verify(self, *args):
        return {"n_drafted": 0, "n_accepted": 0, **next(answers)}

    monkeypatch.setattr(RemoteDraftClient, "_verify", verify)
    monkeypatch.setattr(RemoteDraftClient, "_end_session", lambda self, session_id: None)
    with RemoteDraftClient(target, "http://127.0.0.1:9", draft_tokens=0, server=ServerInfo("m", 512)) as client:
        got = client.generate(target.tokenize("x ="), max_tokens=10)
    assert got.finish_reason == "eos" and got.tokens == [first, first, other_end]
    assert got.text == target.detokenize([first, first])
