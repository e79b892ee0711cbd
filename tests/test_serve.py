"""The completion server on loopback, driven by the real ``openai`` client and by raw HTTP."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import tiny_models
from codeaccel.decoding.autoregressive import generate as autoregressive_generate
from codeaccel.decoding.batched import BatchDecoder
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine, open_sequences
from codeaccel.engines.cost_curve import CostCurve, save_cost_curve
from codeaccel.errors import UserError
from codeaccel.serve.app import create_app
from codeaccel.serve.events import EventStore
from codeaccel.serve.metrics import ServerMetrics
from codeaccel.serve.prompts import chat_prompt, fim_prompt
from codeaccel.serve.scheduler import Failed, Finished, Job, Progress, QueueFull, Scheduler
from codeaccel.serve.schemas import CompletionRequest, EventRequest
from codeaccel.serve.settings import ServeSettings, load_settings
from codeaccel.serve.streaming import StreamCursor, safe_prefix
from live_server import LiveServer, pin_flat_cost_curve

PROMPTS = ["def add(a, b):\n", "import json\n\ndef load(path):\n", "class Stack:\n    def push(", "for i in range("]
CTX = 512
LONG_PROMPT = "import"  # the tiny model's greedy continuation runs past 400 tokens (checked below)


@pytest.fixture(scope="module")
def server(fim_gguf, tmp_path_factory):
    settings = ServeSettings(
        model=fim_gguf,
        parallel=4,
        ctx_size=CTX,
        max_queue=16,
        default_max_tokens=24,
        events_db=tmp_path_factory.mktemp("events") / "events.sqlite",
        completion_cache=0,  # these tests send requests again to see them decoded (the cache: test_remote.py)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        pin_flat_cost_curve("tiny-fim")
        with LiveServer(settings) as live:
            yield live


@pytest.fixture(scope="module")
def alone(fim_gguf):
    """The same request decoded alone by the plain autoregressive loop: the reference output."""
    engine = load_engine(fim_gguf, n_ctx=CTX)

    def run(tokens: list[int], max_tokens: int, stop=()) -> str:
        return autoregressive_generate(engine, tokens, SamplingParams(), max_tokens, stop).text

    run.engine = engine
    yield run
    engine.close()


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.head(server.url + "/health").status_code == 200
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].id == "tiny-fim"
    assert models[0].model_extra["max_model_len"] == CTX


def test_greedy_completion_equals_decoding_alone(server, alone):
    got = server.client().completions.create(model="tiny-fim", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    expected = alone(alone.engine.tokenize(PROMPTS[0]), 20)
    assert got.choices[0].text == expected
    assert got.usage.prompt_tokens == len(alone.engine.tokenize(PROMPTS[0]))
    assert got.usage.completion_tokens >= 1
    assert got.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_each_equal_served_alone(server, alone):
    """Many requests in one batch: every greedy output is the one its request gets alone."""
    client = server.client()
    prompts = PROMPTS * 3  # 12 requests on 4 sequences: admitted and retired at different steps
    lengths = [8 + 5 * (i % 4) for i in range(len(prompts))]

    def ask(i: int) -> str:
        r = client.completions.create(model="tiny-fim", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    expected = [alone(alone.engine.tokenize(p), n) for p, n in zip(prompts, lengths)]
    assert got == expected


def test_stream_equals_the_whole_completion(server):
    client = server.client()
    kw = dict(model="tiny-fim", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=["\n\n"])
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens >= 1  # the usage chunk comes last
    last = [c for c in chunks if c.choices][-1].model_extra["timings"]  # the choice's last chunk: its timings
    assert last["predicted_n"] == chunks[-1].usage.completion_tokens and last["total_ms"] > 0


def test_chat_completion_and_its_stream(server):
    client = server.client()
    messages = [{"role": "user", "content": "write a function"}]
    whole = client.chat.completions.create(model="tiny-fim", messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    parts = list(
        client.chat.completions.create(model="tiny-fim", messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason is not None and parts[-1].model_extra["timings"]["total_ms"] > 0
    asked = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "logprobs": True})
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "logprobs"


def test_n_seeded_choices_are_reproducible(server):
    client = server.client()
    kw = dict(model="tiny-fim", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=7, n=3)
    before = _metric(server, "codeaccel_prompt_tokens_total")
    response = client.completions.create(**kw)
    first = [c.text for c in response.choices]
    assert _metric(server, "codeaccel_prompt_tokens_total") - before == response.usage.prompt_tokens  # once, not n
    again = [c.text for c in client.completions.create(**kw).choices]
    assert len(first) == 3 and first == again
    assert len(set(first)) > 1  # three seeds, three samples (peaked tiny model, still different)
    with ThreadPoolExecutor(2) as pool:  # beside another request (other batch shapes): the same samples
        beside = pool.submit(client.completions.create, model="tiny-fim", prompt=PROMPTS[0], max_tokens=24,
                             temperature=0)  # fmt: skip
        crowded = [c.text for c in pool.submit(client.completions.create, **kw).result().choices]
        beside.result()
    assert crowded == first


def test_fim_suffix_equals_a_raw_fim_prompt(server, alone):
    client = server.client()
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    fim = client.completions.create(model="tiny-fim", prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    raw = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    plain = client.completions.create(model="tiny-fim", prompt=raw, max_tokens=10, temperature=0)
    assert fim.choices[0].text == plain.choices[0].text
    tokens = fim_prompt(alone.engine, prefix, suffix, budget=CTX)
    assert fim.usage.prompt_tokens == len(tokens)
    assert fim.choices[0].text == alone(tokens, 10)


QWEN_STOPS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
              "<|file_sep|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip


def test_continue_autocomplete_requests_work_unchanged(server, alone):
    """The bodies Continue's autocomplete sends (README): its llama.cpp provider posts the FIM prompt it
    built from the model's name to /completion, streamed, with null options and a placeholder key; its
    OpenAI provider posts it to /v1/completions. Both equal the server's own FIM of the same cut."""
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    raw = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    expected = alone(fim_prompt(alone.engine, prefix, suffix, budget=CTX), 10)
    nulls = dict.fromkeys(["top_k", "top_p", "min_p", "mirostat", "frequency_penalty", "presence_penalty"])
    body = {"prompt": raw, "stream": True, "n_predict": 10, "stop": QWEN_STOPS, "temperature": 0.01, **nulls}
    headers = {"Authorization": "Bearer undefined"}
    with httpx.stream("POST", server.url + "/completion", json=body, headers=headers) as s:
        assert s.status_code == 200
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True
    greedy = {**body, "stream": False, "temperature": 0}
    r = httpx.post(server.url + "/completion", json=greedy, headers=headers)
    assert r.status_code == 200 and r.json()["content"] == expected
    openai_body = {"model": "tiny-fim", "prompt": raw, "max_tokens": 10, "temperature": 0, "stop": QWEN_STOPS[:4],
                   "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=openai_body, headers=headers) as s:
        lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == expected
    multi = "<|repo_name|>proj\n<|file_sep|>util.py\nPI = 3.14\n<|file_sep|>geo.py\n" + raw  # its repository layout
    r = httpx.post(server.url + "/completion", json={**greedy, "prompt": multi}, headers=headers)
    assert r.status_code == 200 and r.json()["tokens_evaluated"] > len(alone.engine.tokenize(raw))


def test_fim_prompt_layout_and_trimming(alone):
    engine = alone.engine
    pre, suf, mid, repo, sep = (engine.tokenize(t)[0] for t in tiny_models.FIM_SPECIALS)
    tokens = fim_prompt(engine, "a = 1\n", "b = 2\n", budget=CTX, extra=[("util.py", "x = 0\n")])
    assert tokens[0] == repo and tokens.count(sep) == 2 and tokens[-1] == mid
    assert tokens.index(pre) < tokens.index(suf)
    long_prefix = "value = compute(value)\n" * 200
    trimmed = fim_prompt(engine, long_prefix, "tail()\n", budget=64, extra=[("big.py", "y = 1\n" * 50)])
    assert len(trimmed) <= 64 and repo not in trimmed  # the extra files go first
    bare = fim_prompt(engine, "a = 1\n", "", budget=CTX, repo_head=True)  # llama-server's /infill layout
    assert bare[0] == repo and bare.count(sep) == 1 and bare[-2:] == [suf, mid]
    assert engine.detokenize(trimmed[trimmed.index(pre) + 1 : trimmed.index(suf)]).endswith("compute(value)\n")


def test_native_completion_and_infill(server, alone):
    r = httpx.post(server.url + "/completion", json={"prompt": PROMPTS[0], "n_predict": 12, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["stop"] is True
    assert body["content"] == alone(alone.engine.tokenize(PROMPTS[0]), 12)
    assert body["stop_type"] in ("eos", "limit") and body["timings"]["predicted_n"] == body["tokens_predicted"]
    infill = {
        "input_prefix": "def f(x):\n    ",
        "input_suffix": "\n",
        "input_extra": [{"filename": "a.py", "text": "z = 3\n"}],
        "n_predict": 8,
        "temperature": 0,
        "cache_prompt": True,
        "t_max_predict_ms": 500,
    }
    r = httpx.post(server.url + "/infill", json=infill)
    assert r.status_code == 200
    expected = fim_prompt(alone.engine, infill["input_prefix"], "\n", CTX - 8, [("a.py", "z = 3\n")], repo_head=True)
    assert r.json()["content"] == alone(expected, 8)
    with httpx.stream("POST", server.url + "/infill", json={**infill, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and "".join(e["content"] for e in events) == r.json()["content"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"prompt": "\xff\xfe bad utf-8"}', 400, None),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "n": 1000}).encode(), 400, "n"),
        (json.dumps({"prompt": [999999]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x " * 2000}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
        (json.dumps({"prompt": []}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "a\ud800"}).encode(), 400, None),  # a lone surrogate: valid JSON, not text
        (json.dumps({"prompt": "x", "\ud800": "\ud800"}).encode(), 400, None),  # in a key too (an unknown field)
        (json.dumps({"prompt": "x", "extra": {"\udc00k": 1}}).encode(), 400, None),  # nested
        (json.dumps({"prompt": "x", "stop": ["a"] * 17}).encode(), 400, "stop"),
        (json.dumps({"prompt": "x", "stop": "y" * 600}).encode(), 400, "stop"),
        (json.dumps({"prompt": ["x"] * 10, "n": 3}).encode(), 400, None),  # 30 choices > 4 sequences + 16 queued
        (json.dumps({"prompt": "x", "seed": -2}).encode(), 400, "seed"),
        (json.dumps({"prompt": "x", "max_tokens": None, "temperature": None}).encode(), 200, None),  # null: default
        (json.dumps({"prompt": [True]}).encode(), 400, "prompt"),  # strict types: a boolean is no token id
        (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
        (json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": 2, "temperature": 0}).encode(), 200, None),  # an int for a float
        (json.dumps({"prompt": "x", "logprobs": 2}).encode(), 400, "logprobs"),  # not returned: said so
        (json.dumps({"prompt": "x", "logprobs": 0, "max_tokens": 2}).encode(), 200, None),
        (json.dumps({"prompt": [1, 2], "suffix": "y"}).encode(), 400, None),  # a suffix it could not place
        (json.dumps({"prompt": "x", "echo": True, "stream": True}).encode(), 400, None),
    ],
)
def test_bad_input_is_a_4xx_with_an_openai_error(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["choices"][0]["text"] is not None
        return
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_body_and_the_openai_client_error(server):
    r = httpx.post(
        server.url + "/v1/completions", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tiny-fim", prompt="x", max_tokens=-1)
    assert info.value.status_code == 400


def test_disconnected_stream_frees_its_sequence(server, alone):
    assert len(alone.engine.tokenize(alone(alone.engine.tokenize(LONG_PROMPT), 400))) > 300  # still running when cut
    state = server.app.state.codeaccel
    before = _metric(server, "codeaccel_cancelled_total")
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "stream": True},
    ) as s:
        next(s.iter_lines())
    deadline = time.time() + 10
    while state.runtime.scheduler.in_system and time.time() < deadline:
        time.sleep(0.05)
    assert state.runtime.scheduler.in_system == 0
    assert _metric(server, "codeaccel_cancelled_total") == before + 1


def test_a_client_that_gives_up_on_a_whole_response_frees_its_sequence(server, alone):
    """Not streaming: an editor cancelling a completion on the next keystroke closes the connection; the
    server notices while it waits for the result and cancels the generation (not at max_tokens)."""
    assert len(alone.engine.tokenize(alone(alone.engine.tokenize(LONG_PROMPT), 400))) > 300  # still running when cut
    state = server.app.state.codeaccel
    before = _metric(server, "codeaccel_cancelled_total")
    body = {"prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0}
    state.runtime.scheduler.between_steps(lambda: time.sleep(1.5))  # still queued when the client gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.5))
    deadline = time.time() + 10
    while state.runtime.scheduler.in_system and time.time() < deadline:
        time.sleep(0.05)
    assert state.runtime.scheduler.in_system == 0
    assert _metric(server, "codeaccel_cancelled_total") == before + 1


def test_queue_time_ends_when_a_request_gets_its_sequence_not_after_its_prompt(server):
    """A request alone waits for nothing: its queue time ends when it gets its sequence, far below its prompt's
    evaluation (it used to end after the prompt, counting the prefill twice)."""
    body = {"prompt": LONG_PROMPT + " unique " * 50, "max_tokens": 2, "temperature": 0, "cache_prompt": False}
    alone = httpx.post(server.url + "/completion", json=body, timeout=60).json()["timings"]
    assert alone["prompt_ms"] > 0 and alone["queue_ms"] < 0.5 * alone["prompt_ms"]
    assert alone["total_ms"] >= alone["queue_ms"] + alone["prompt_ms"] - 1


def test_events_are_stored(server):
    r = httpx.post(server.url + "/v1/events", json={"type": "select", "completion_id": "cmpl-1", "choice_index": 0})
    assert r.status_code == 200
    stored = server.app.state.codeaccel.events.events("select")
    assert stored[-1]["id"] == r.json()["id"] and stored[-1]["completion_id"] == "cmpl-1"
    bad = httpx.post(server.url + "/v1/events", json={"type": "liked", "completion_id": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "type"


def test_metrics_name_the_counters_as_vllm_and_llama_cpp(server):
    server.client().completions.create(model="tiny-fim", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "vllm:spec_decode_num_drafts_total",
        "llamacpp:spec_decode_num_draft_tokens_total",
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="0"}',
        "codeaccel_time_to_first_token_seconds_bucket",
        "codeaccel_batch_occupancy",
    ):
        assert name in text
    assert _metric(server, "codeaccel_generation_tokens_total") > 0
    assert _metric(server, "llamacpp:tokens_predicted_total") == _metric(server, "codeaccel_generation_tokens_total")
    assert 0 < _metric(server, "llamacpp:prompt_tokens_total") <= _metric(server, "codeaccel_prompt_tokens_total")
    assert "llamacpp:requests_processing " in text and "llamacpp:requests_deferred " in text


def test_api_key_is_required_when_set(fim_gguf, tmp_path):
    settings = ServeSettings(model=fim_gguf, parallel=1, ctx_size=256, api_key="s3cret", events_db=tmp_path / "e.db")
    with LiveServer(settings) as live:
        assert httpx.post(live.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").completions.create(model="tiny-fim", prompt="x", max_tokens=2)
        ok = live.client(api_key="s3cret").completions.create(model="tiny-fim", prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens >= 1


def test_health_is_503_until_the_model_loads(tmp_path):
    from fastapi.testclient import TestClient

    settings = ServeSettings(model=str(tmp_path / "missing.gguf"), events_db=tmp_path / "e.db")
    with TestClient(create_app(settings, load_in_background=False)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "missing.gguf" in r.json()["error"]["message"]
        assert client.head("/health").status_code == 503
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 503


def test_health_is_503_with_retry_after_while_loading_then_200(fim_gguf, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import codeaccel.serve.app as app_module

    release = threading.Event()
    real_load = app_module.load_engine

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_engine", slow_load)
    settings = ServeSettings(model=fim_gguf, ctx_size=CTX, parallel=2, events_db=tmp_path / "e.db", completion_cache=0)
    with TestClient(create_app(settings)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "loading"
        assert loading.headers["retry-after"] == "5"
        release.set()
        deadline = time.time() + 30
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 200


def test_a_full_server_answers_503_with_retry_after(server):
    """4 sequences and 16 queued: with the scheduler held, 20 requests fill it and the next gets a 503."""
    state = server.app.state.codeaccel
    state.runtime.scheduler.between_steps(lambda: time.sleep(2.0))
    body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(20) as pool:
        held = [pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60) for _ in range(20)]
        deadline = time.time() + 10
        while state.runtime.scheduler.in_system < 20 and time.time() < deadline:
            time.sleep(0.02)
        full = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        assert all(f.result().status_code == 200 for f in held)


def test_full_queue_refuses_and_counts_nothing(fim_gguf):
    engine = load_engine(fim_gguf, n_ctx=128)
    try:
        with open_sequences(engine, n_seq_max=1, n_ctx=128) as seqs:
            scheduler = Scheduler(seqs, max_queue=1, metrics=ServerMetrics())
            jobs = [Job(Request([1, 2], max_tokens=2), sink=lambda e: None) for _ in range(3)]
            with pytest.raises(UserError, match="holds 2 at once"):  # more choices than could ever run: a 400
                scheduler.submit(jobs)
            assert scheduler.in_system == 0
            scheduler.submit(jobs[:2])
            assert scheduler.in_system == 2
            with pytest.raises(QueueFull):  # full for now: a 503, retry later
                scheduler.submit(jobs[2:])
            assert scheduler.in_system == 2
    finally:
        engine.close()


def test_stream_holds_back_a_possible_stop_string_and_half_characters():
    assert safe_prefix("abc\n\n", ["\n\ndef"]) == "abc"
    assert safe_prefix("abc\nx", ["\n\ndef"]) == "abc\nx"
    assert safe_prefix("abc\ufffd", []) == "abc"
    cursor = StreamCursor(["END"])
    assert cursor.advance("hello E") == "hello "
    assert cursor.advance("hello EN") == ""
    assert cursor.advance("hello ENx") == "ENx"
    assert cursor.advance("hello ENx", final=True) == ""


def test_settings_precedence_flags_env_file(tmp_path, monkeypatch):
    config = tmp_path / "serve.toml"
    config.write_text("parallel = 3\nport = 9000\nctx_size = 1024\n")
    monkeypatch.setenv("CODEACCEL_SERVE_PORT", "9100")
    s = load_settings(config, parallel=5)
    assert (s.parallel, s.port, s.ctx_size) == (5, 9100, 1024)
    with pytest.raises(UserError, match="parallel"):
        load_settings(None, parallel=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_settings(bad)
    draft = tmp_path / "draft.toml"  # a setting that needs others from the file, given as a flag
    draft.write_text(f'method = "draft-model"\ndraft_versions = "{tmp_path / "v"}"\n')
    s = load_settings(draft, auto_tune=50)
    assert (s.method, s.auto_tune, s.draft_versions) == ("draft-model", 50, tmp_path / "v")
    with pytest.raises(UserError, match="needs draft_versions"):
        load_settings(None, auto_tune=50)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("paralel = 3\n")
    with pytest.raises(UserError, match="paralel"):
        load_settings(unknown)


def test_event_store_survives_reopen(tmp_path):
    store = EventStore(tmp_path / "events.sqlite")
    ids = [store.add(EventRequest(type="view", completion_id=f"c{i}")) for i in range(3)]
    again = EventStore(tmp_path / "events.sqlite")
    assert [e["id"] for e in again.events()] == ids
    # acknowledged = on disk: a kill -9 keeps the page cache, so only the setting shows it (FULL = 2)
    assert again._connect().execute("PRAGMA synchronous").fetchone()[0] == 2


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def test_a_predicted_output_is_drafted_and_verified_in_the_batch(server, alone):
    """OpenAI's ``prediction``: its tokens are drafted and verified losslessly (the counters say how many)."""
    expected = alone(alone.engine.tokenize(PROMPTS[1]), 40)
    client = server.client()
    before = _metric(server, "vllm:spec_decode_num_accepted_tokens_total")
    got = client.completions.create(
        model="tiny-fim",
        prompt=PROMPTS[1],
        max_tokens=40,
        temperature=0,
        extra_body={"prediction": {"type": "content", "content": expected}},
    )
    assert got.choices[0].text == expected
    assert _metric(server, "vllm:spec_decode_num_accepted_tokens_total") - before >= 10
    wrong = client.completions.create(
        model="tiny-fim",
        prompt=PROMPTS[1],
        max_tokens=40,
        temperature=0,
        extra_body={"prediction": {"type": "content", "content": "nothing like it"}},
    )
    assert wrong.choices[0].text == expected
    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat = client.chat.completions.create(
        model="tiny-fim",
        messages=messages,
        max_tokens=20,
        temperature=0,
        prediction={"type": "content", "content": "return a + b"},
    )
    assert chat.choices[0].message.content == alone(chat_prompt(alone.engine, messages), 20)


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(6):
            yield b" " * (1024 * 1024)

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.get(server.url + "/health").status_code == 200


def test_native_endpoints_follow_llama_server_on_edge_cases(server, alone):
    """n_predict 0 is a warm-up (nothing generated); /infill keeps the prefix when n_predict is huge and
    reads markup in the user's code as text, as llama-server does; an event's index is bounded; a whole
    number sent as a float is that integer (llama-server's reading), a fraction is refused."""
    r = httpx.post(server.url + "/completion", json={"prompt": PROMPTS[0], "n_predict": 0})
    assert r.status_code == 200 and r.json()["content"] == "" and r.json()["tokens_predicted"] == 0
    assert r.json()["tokens_evaluated"] == len(alone.engine.tokenize(PROMPTS[0]))
    prefix = "s = '<|fim_middle|>'\ndef f(x):\n    "
    r = httpx.post(server.url + "/infill", json={"input_prefix": prefix, "input_suffix": "\n", "n_predict": 8,
                                                 "temperature": 0})  # fmt: skip
    text_prompt = fim_prompt(alone.engine, prefix, "\n", CTX - 8, repo_head=True, special=False)
    markup_prompt = fim_prompt(alone.engine, prefix, "\n", CTX - 8, repo_head=True)
    assert text_prompt != markup_prompt  # the literal is several tokens, not the control token
    assert r.status_code == 200 and r.json()["tokens_evaluated"] == len(text_prompt)
    assert r.json()["content"] == alone(text_prompt, 8)
    r = httpx.post(server.url + "/infill", json={"input_prefix": prefix, "input_suffix": "\n", "n_predict": 10**6,
                                                 "temperature": 0})  # fmt: skip
    assert r.status_code == 200 and r.json()["tokens_evaluated"] == len(text_prompt)  # nothing of it dropped
    r = httpx.post(server.url + "/v1/events", json={"type": "view", "completion_id": "x", "choice_index": 10**20})
    assert r.status_code == 400 and r.json()["error"]["param"] == "choice_index"
    whole = {"prompt": PROMPTS[0], "n_predict": 4.0, "top_k": 40.0, "seed": -1.0, "temperature": 0}
    r = httpx.post(server.url + "/completion", json=whole)  # whole numbers as floats, read as llama-server does
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
    r = httpx.post(server.url + "/completion", json={**whole, "n_predict": 4.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"


def test_usage_chunk_carries_the_streams_id(server):
    body = {"model": "tiny-fim", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_the_scheduler_survives_bugs_in_a_step_a_submit_or_the_bookkeeping_after(fim_gguf, monkeypatch):
    """A bug (not a codeaccel error) in a step, in submitting a job or in the metrics after a step fails the jobs
    concerned with a 500-type error and the thread keeps serving: the next job completes, nothing is left in
    the system; once stopped the thread reads not alive (/health says 503)."""
    engine = load_engine(fim_gguf, n_ctx=256)
    broken: set[str] = set()
    real_step, real_submit, real_observe = BatchDecoder.step, BatchDecoder.submit, ServerMetrics.observe_step

    def fail_once(name: str, error: Exception, real):
        def patched(self, *args):
            if name in broken:
                broken.discard(name)
                raise error
            return real(self, *args)

        return patched

    monkeypatch.setattr(BatchDecoder, "step", fail_once("step", ValueError("step bug"), real_step))
    monkeypatch.setattr(BatchDecoder, "submit", fail_once("submit", KeyError("submit bug"), real_submit))
    monkeypatch.setattr(ServerMetrics, "observe_step", fail_once("after", ZeroDivisionError("metrics bug"),
                                                                 real_observe))  # fmt: skip
    try:
        with open_sequences(engine, n_seq_max=2, n_ctx=256) as seqs:
            scheduler = Scheduler(seqs, max_queue=2, metrics=ServerMetrics())
            scheduler.start()
            events: list = []
            done = threading.Event()

            def sink(event):
                if not isinstance(event, Progress):
                    events.append(event)
                    done.set()

            def run(prompt: str) -> object:
                done.clear()
                scheduler.submit([Job(Request(engine.tokenize(prompt), max_tokens=8), sink=sink)])
                assert done.wait(30)
                return events[-1]

            for name, message in [("step", "step bug"), ("submit", "submit bug"), ("after", "metrics bug")]:
                broken.add(name)
                assert isinstance(run(PROMPTS[0]), Failed) and message in str(events[-1].error)
                finished = run(PROMPTS[1])
                assert isinstance(finished, Finished) and finished.generation.tokens
                assert scheduler.alive and scheduler.in_system == 0
            assert scheduler.stop() and not scheduler.alive
            assert seqs.open_sequences == []
    finally:
        engine.close()


def test_an_error_after_a_stream_started_is_an_error_event_then_done():
    import asyncio

    from codeaccel.serve.app import _sse

    async def chunks():
        yield "data: {}\n\n"
        raise ValueError("a bug mid-stream")

    async def read(response) -> list[str]:
        return [c if isinstance(c, str) else c.decode() async for c in response.body_iterator]

    sent = asyncio.run(read(_sse(chunks(), None)))
    error = json.loads(sent[1][len("data: ") :])["error"]
    assert error["type"] == "server_error" and "ValueError" in error["message"] and sent[2] == "data: [DONE]\n\n"
    native = asyncio.run(read(_sse(chunks(), None, done_marker=False)))
    assert len(native) == 2 and "error" in native[1]  # llama-server's streams end without [DONE]


def test_draft_model_drafts_are_verified_in_the_batch(fim_gguf, tmp_path, monkeypatch, alone):
    """--method draft-model: the draft model (here the target's own weights: every draft token is
    accepted) drafts for all concurrent requests at once; every answer equals decoding alone."""
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    pin_flat_cost_curve("tiny-fim")
    draft = tmp_path / "tiny-draft.gguf"  # the same weights under a name whose measured step is 10x faster
    shutil.copyfile(fim_gguf, draft)
    relative = [1.0 if k <= 8 else 1.0 + 0.25 * (k - 8) for k in range(1, 33)]
    save_cost_curve(CostCurve("tiny-draft", "llama.cpp", None, 0, 1, list(range(1, 33)), [0.0001] * 32, relative))
    settings = ServeSettings(model=fim_gguf, method="draft-model", draft_model=str(draft), parallel=4, ctx_size=CTX,
                             events_db=tmp_path / "events.sqlite")  # fmt: skip
    with LiveServer(settings) as live:
        client = live.client()

        def complete(prompt: str) -> str:
            return (
                client.completions.create(model="tiny-fim", prompt=prompt, max_tokens=20, temperature=0).choices[0].text
            )

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(complete, PROMPTS))
        drafted = _metric(live, "vllm:spec_decode_num_draft_tokens_total")
        accepted = _metric(live, "vllm:spec_decode_num_accepted_tokens_total")
    assert got == [alone(alone.engine.tokenize(p), 20) for p in PROMPTS]
    assert drafted > 0 and accepted == drafted  # its own tokens: all accepted


def test_echo_returns_each_choices_own_prompt(server, alone):
    got = server.client().completions.create(model="tiny-fim", prompt=PROMPTS[:2], max_tokens=3, temperature=0,
                                             echo=True)  # fmt: skip
    assert [c.text[: len(p)] for c, p in zip(got.choices, PROMPTS[:2])] == PROMPTS[:2]
    ids = alone.engine.tokenize(PROMPTS[2])
    got = server.client().completions.create(model="tiny-fim", prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert got.choices[0].text.startswith(alone.engine.detokenize(ids))


def test_a_prompt_that_extends_a_finished_one_starts_from_its_cache(server, alone):
    """llama.cpp's cache_prompt: an editor sends the file again, a line further on; the server evaluates
    only the new tokens (timings.cache_n, usage's cached_tokens, vLLM's prefix-cache counters), and the
    completion is the one decoding alone gives. cache_prompt false evaluates the whole prompt."""
    prefix = "import json\n\n\ndef parse(text):\n    data = json.loads(text)\n"
    body = {"input_prefix": prefix, "input_suffix": "\n", "n_predict": 8, "temperature": 0}
    first = httpx.post(server.url + "/infill", json=body).json()
    hits_before = _metric(server, "vllm:prefix_cache_hits_total")
    typed = {**body, "input_prefix": prefix + "    return data\n\n\ndef dump(obj):\n"}
    second = httpx.post(server.url + "/infill", json=typed).json()
    n_prompt = second["tokens_evaluated"]
    assert second["timings"]["cache_n"] >= len(alone.engine.tokenize(prefix)) - 2
    assert second["timings"]["cache_n"] + second["timings"]["prompt_n"] == n_prompt
    expected = fim_prompt(alone.engine, typed["input_prefix"], "\n", CTX - 8, repo_head=True)
    assert second["content"] == alone(expected, 8)
    assert _metric(server, "vllm:prefix_cache_hits_total") - hits_before == second["timings"]["cache_n"]
    cold = httpx.post(server.url + "/infill", json={**typed, "cache_prompt": False}).json()
    assert cold["timings"]["cache_n"] == 0 and cold["content"] == second["content"]
    assert first["timings"]["prompt_n"] >= 1
    again = server.client().completions.create(model="tiny-fim", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    repeat = server.client().completions.create(model="tiny-fim", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert repeat.usage.prompt_tokens_details.cached_tokens == repeat.usage.prompt_tokens - 1  # the last is re-read
    assert repeat.choices[0].text == again.choices[0].text
    warm_body = {"input_prefix": "def area(r):\n    pi = 3.14159\n", "input_suffix": "\n", "temperature": 0}
    warm = httpx.post(server.url + "/infill", json={**warm_body, "n_predict": 0}).json()  # llama.vim's warm-up
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    assert warm["timings"]["prompt_n"] >= 1  # evaluated (beyond a shared FIM header), into a kept cache
    assert warm["timings"]["prompt_n"] + warm["timings"]["cache_n"] == warm["tokens_evaluated"]
    real = httpx.post(server.url + "/infill", json={**warm_body, "n_predict": 6}).json()
    assert real["timings"]["cache_n"] == real["tokens_evaluated"] - 1


# ---- bad input: each a defect found by probing the server (a 500, a misleading answer, seconds of work) ----
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _counting(monkeypatch, engine, name: str) -> list:
    """Calls of ``engine.<name>`` from now on (the method still runs)."""
    calls: list = []
    real = getattr(engine, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, name, counted)
    return calls


def test_deeply_nested_json_is_a_4xx_never_a_500(server):
    """An ignored field nested as deep as the JSON parser allows: the check for lone surrogates walked it
    recursively and raised RecursionError (a 500) a few levels short of the parser's own limit."""
    for depth in range(900, 1001, 4):
        body = b'{"prompt": "a", "max_tokens": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (depth, r.text)
        if r.status_code == 400:
            _error(r, 400)
    deep: list = ["a\ud800"]
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="lone surrogate"):
        CompletionRequest.model_validate({"prompt": "a", "x": deep})


def test_a_body_not_sent_as_json_is_a_415_that_says_so(server):
    """curl -d sends a form's Content-Type: the JSON was never read, and the answer was a 400 saying the body
    "should be a valid dictionary". Refused with 415 and the header to send (a text/plain body is not
    read as JSON: a web page may post one to a local server without asking)."""
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": content_type})
        error = _error(r, 415)
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    r = httpx.post(server.url + "/v1/events", content=b'{"type": "view", "completion_id": "x"}',
                   headers={"content-type": "text/plain"})  # fmt: skip
    assert _error(r, 415)["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"content-type": "application/json; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200


def test_a_validation_error_names_the_nested_field(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"content": "hi"}]})
    error = _error(r, 400)
    assert error["message"] == "messages[0].role: Field required" and error["param"] == "messages"
    r = httpx.post(server.url + "/v1/verify", json={"context": []})
    assert _error(r, 400)["message"] == "context must not be empty"  # no pydantic "Value error, " prefix


def test_verify_names_the_list_that_holds_a_bad_token(server):
    """Out-of-vocabulary ids in /v1/verify were all reported as param "prompt", a field it does not have."""
    cases = [
        ({"context": [1, -2]}, "context"),
        ({"context": [1, 2], "append": [999]}, "append"),
        ({"context": [1, 2], "draft": [400]}, "draft"),
        ({"context": [1, 2], "draft": [4], "draft_probs": [{"4": 1.0, "-1": 0.0}], "temperature": 1}, "draft_probs"),
    ]
    for body, param in cases:
        error = _error(httpx.post(server.url + "/v1/verify", json=body), 400)
        assert error["param"] == param and error["message"].startswith(f"{param}: token ids out of range")


def test_too_many_choices_are_refused_before_any_prompt_is_tokenized(server, monkeypatch):
    """100,000 prompts in one body were all tokenized (seconds of work) before the scheduler refused them."""
    calls = _counting(monkeypatch, server.app.state.codeaccel.runtime.engine, "tokenize")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["def f(x): return x"] * 5000, "max_tokens": 2})
    assert "5000 choices" in _error(r, 400)["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["a", "b"], "n": 16, "max_tokens": 2})
    assert "32 choices" in _error(r, 400)["message"]
    assert calls == []


def test_more_chat_messages_than_the_context_holds_are_refused_before_the_template(server, monkeypatch):
    """60,000 messages (2.4 MB) kept the template and the tokenizer busy for over 30 seconds before the
    prompt was found too long: each message renders as a token at least, so they cannot fit."""
    calls = _counting(monkeypatch, server.app.state.codeaccel.runtime.engine, "apply_chat_template")
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * CTX})
    error = _error(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert calls == []


def test_infill_tokenizes_only_the_extra_files_that_fit(server, alone, monkeypatch):
    """/infill tokenized every input_extra file (60,000 took 17 s) though only the newest ones fit: the
    prompt is the same as with just those, and the files are tokenized newest first, as far as fits."""
    extra = [(f"f{i}.py", f"x{i} = {i}\n") for i in range(3000)]
    calls = _counting(monkeypatch, alone.engine, "tokenize")
    many = fim_prompt(alone.engine, "def f(x):\n    ", "\n", 64, extra, repo_head=True)
    assert 0 < len(calls) < 60
    assert many == fim_prompt(alone.engine, "def f(x):\n    ", "\n", 64, extra[-30:], repo_head=True)
    body = {"input_prefix": "def f(x):\n    ", "input_suffix": "\n", "n_predict": 2, "temperature": 0,
            "input_extra": [{"filename": f, "text": t} for f, t in extra]}  # fmt: skip
    server_calls = _counting(monkeypatch, server.app.state.codeaccel.runtime.engine, "tokenize")
    r = httpx.post(server.url + "/infill", json=body)
    assert r.status_code == 200 and r.json()["tokens_evaluated"] <= CTX - 2
    assert len(server_calls) < 2 * CTX  # not 2 per file


def test_a_vanishing_temperature_samples_as_greedy(server):
    """temperature 1e-310 passed validation (>= 0) and divided the logits into inf: every probability NaN,
    and the sampler took the vocabulary's last token at each step."""
    kw = {"prompt": PROMPTS[0], "max_tokens": 8}
    greedy = httpx.post(server.url + "/v1/completions", json={**kw, "temperature": 0}).json()
    tiny = httpx.post(server.url + "/v1/completions", json={**kw, "temperature": 1e-310, "seed": 1}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
