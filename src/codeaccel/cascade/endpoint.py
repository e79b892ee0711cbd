"""A black-box cascade stage: any OpenAI-compatible chat endpoint, named ``openai:MODEL@BASE_URL``.

The stage is asked what a local model is asked (the greedy answer, ``N_SAMPLES`` sampled
answers, a greedy and ``N_SAMPLES`` sampled tests per l; temperature, top-p and seed as
for a local model), through ``/chat/completions`` with the official ``openai`` client. A
chat endpoint cannot be made to start its reply the way a local model's reply is started
(the code fence and the function's signature for an answer, ``assert f(`` for a test), so
its replies are read as a chat model writes them:

* an answer is the first fenced code block of the reply (or the whole reply when it has
  none), stored in the form every stage's answers take, the completion of the problem's
  started code (:func:`answer_completion`);
* a test request asks for the lines in one code block and leaves room for a preamble;
  its reply is stored as a fenced block of its first code block, which
  :func:`~codeaccel.cascade.self_tests.extract_test_lines` reads as it reads a local model's.

Cost, measured as a client sees it (the endpoint's hardware and batching are unknown): for
b = 1, 2, 4, 8 requests in flight at once, wall seconds per decode step (the slope between a
short and a long round of b sampled replies, which cancels the round trip), and what a round
costs beyond its steps, per prompt token (:meth:`EndpointStage.measure_costs`); the replay
prices the endpoint's stages from these as it prices a local model's
(:mod:`codeaccel.cascade.cost`), at the one price per hour of the report. For a hosted API
billed per token that price means little: compare such a stage by its seconds, or set the
price to what its seconds cost. Token counts are the endpoint's own (``usage``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from codeaccel import machine
from codeaccel.bench.datasets import FENCE
from codeaccel.cascade.config import SAMPLE_TEMPERATURE, GenerationKey
from codeaccel.cascade.problems import CascadeProblem
from codeaccel.cascade.self_tests import self_test_prompt
from codeaccel.cascade.store import BatchCost, StoredGeneration
from codeaccel.errors import SetupError, UserError
from codeaccel.models.registry import BUNDLED, canonical_name, resolve_model

log = logging.getLogger(__name__)

SCHEME = "openai:"
COST_BATCH_SIZES = (1, 2, 4, 8)
COST_TOKENS = 16  # tokens asked per request in a short timing round (a long one asks 4× as many)
TEST_REPLY_FORM = " Reply with one ```python block of those lines only."
TEST_EXTRA_TOKENS = 64  # beyond a local model's budget for tests: a chat reply is not started for the model
_BLOCK = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n(.*?)(?:\r?\n```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Endpoint:
    model: str  # the name the endpoint serves the model under
    base_url: str  # up to and including /v1
    api_key_env: str = "OPENAI_API_KEY"  # read at connection time; "none" when unset (local servers)

    @property
    def name(self) -> str:
        """The stage's name in the store: the scheme and the model (not the URL, which may move)."""
        return f"{SCHEME}{self.model}"


def parse_endpoint(spec: str) -> Endpoint | None:
    """``openai:MODEL@BASE_URL`` → an Endpoint; any other spec (a local model) → None."""
    if not spec.startswith(SCHEME):
        return None
    model, sep, url = spec[len(SCHEME) :].rpartition("@")
    if not sep or not model or not re.match(r"https?://[^/\s]+", url):
        raise UserError(f"an endpoint stage is openai:MODEL@http(s)://HOST[:PORT]/v1, got {spec!r}")
    return Endpoint(model=model, base_url=url.rstrip("/"))


def is_endpoint_name(name: str) -> bool:
    """Whether a stored stage name is an endpoint's (:attr:`Endpoint.name`)."""
    return name.startswith(SCHEME)


def stage_name(spec: str) -> str:
    """The name a stage's generations are stored under: the endpoint's, or the local model's (a bundled
    model's without assembling its weights: replaying a store needs no model)."""
    endpoint = parse_endpoint(spec)
    if endpoint:
        return endpoint.name
    name = canonical_name(spec)
    return name if name in BUNDLED else resolve_model(spec).name


def first_code_block(reply: str) -> str:
    """The first fenced block's content, or the whole reply where it has none."""
    match = _BLOCK.search(reply)
    return (match.group(1) if match else reply).strip("\n")


def answer_completion(cp: CascadeProblem, reply: str) -> str:
    """A chat reply's code as the completion of the problem's started code (``problem.code_prefix``).

    Every stored answer is run as ``code_prefix + answer``. A chat model rewrites the whole
    program instead of continuing it: where its code repeats the started code, the rest is
    the completion; an indented reply is a body that continues it; otherwise the model's
    program follows the started code (HumanEval's signature and docstring, a complete
    function with a docstring for a body; MBPP's imports), and its definitions replace it.
    """
    code = first_code_block(reply)
    prefix = cp.problem.code_prefix
    if not prefix.strip() or code[:1] in (" ", "\t"):
        return code
    if code.startswith(prefix):
        return code[len(prefix) :]
    return f"\n\n{code}"


class EndpointStage:
    """One connection to an endpoint; generates a problem's answers and tests, measures its cost.

    ``concurrency`` requests in flight at once (at least the largest batch size timed)."""

    def __init__(self, endpoint: Endpoint, concurrency: int = 8, timeout_s: float = 300.0):
        try:
            import openai  # the product's client for black-box stages
        except ImportError:
            raise SetupError("an endpoint stage needs the openai client: pip install 'codeaccel[endpoint]'") from None
        from openai.types import Model
        from openai.types.chat import ChatCompletion

        self.endpoint = endpoint
        self.model_name = endpoint.name
        self.concurrency = max(concurrency, max(COST_BATCH_SIZES))
        key = os.environ.get(endpoint.api_key_env) or "none"
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=key, timeout=timeout_s, max_retries=2)
        self._timing = self._client.with_options(max_retries=0)  # a retry's back-off is no decode time
        self._errors = (openai.OpenAIError, ValueError)  # ValueError: a body that is no JSON
        self._completion_type, self._model_type = ChatCompletion, Model  # what well-formed answers parse to
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="cascade-endpoint")

    def close(self, aborted: bool = False) -> None:
        """Let go of the connection; ``aborted``: without waiting for requests in flight (they fail at once)."""
        if aborted:
            self._client.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        self._pool.shutdown(wait=True)
        self._client.close()

    def check(self) -> None:
        """Refuse an unreachable endpoint or one that does not serve the model, before anything runs."""
        try:
            models = list(self._client.models.list())
        except self._errors as e:
            raise UserError(f"endpoint {self.endpoint.base_url} is unreachable or refused: {_one_line(e)}") from None
        if not all(isinstance(m, self._model_type) for m in models):
            raise UserError(f"endpoint {self.endpoint.base_url} answered /models with something else than a model list")
        served = [m.id for m in models]
        if served and self.endpoint.model not in served:
            raise UserError(f"endpoint {self.endpoint.base_url} serves {', '.join(served)}, not {self.endpoint.model}")

    def _chat(self, messages: list[dict], temperature: float, top_p: float, seed: int | None, max_tokens: int,
              timed: bool = False):  # fmt: skip
        """(reply, completion tokens, prompt tokens, finish reason, wall seconds) of one request.

        ``seed`` None: none is sent (greedy); ``timed``: no retries (a cost measurement)."""
        client = self._timing if timed else self._client
        t0 = time.perf_counter()
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        if seed is not None:
            sampling["seed"] = seed  # not sent at all for greedy requests: strict servers refuse a null
        try:
            resp = client.chat.completions.create(model=self.endpoint.model, messages=messages, **sampling)
        except self._errors as e:
            raise UserError(f"endpoint {self.endpoint.base_url}: {_one_line(e)}") from None
        wall = time.perf_counter() - t0
        usage = getattr(resp, "usage", None)
        if not isinstance(resp, self._completion_type) or not resp.choices or usage is None:
            raise UserError(f"endpoint {self.endpoint.base_url} answered without a chat completion and its usage")
        if not isinstance(usage.completion_tokens, int) or not isinstance(usage.prompt_tokens, int):
            raise UserError(f"endpoint {self.endpoint.base_url} answered without token counts (usage)")
        choice = resp.choices[0]
        reply = choice.message.content or ""
        return reply, usage.completion_tokens, usage.prompt_tokens, choice.finish_reason or "stop", wall

    def _round(self, messages: list[dict], b: int, max_tokens: int) -> tuple[float, int, int]:
        """b sampled requests at once: (wall seconds, the longest reply's tokens, all tokens)."""
        t0 = time.perf_counter()
        runs = list(self._pool.map(lambda i: self._chat(messages, SAMPLE_TEMPERATURE, 1.0, i, max_tokens, True),
                                   range(b)))  # fmt: skip
        return time.perf_counter() - t0, max(r[1] for r in runs), sum(r[1] for r in runs)

    def measure_costs(self, cp: CascadeProblem, sizes: Sequence[int] = COST_BATCH_SIZES) -> list[BatchCost]:
        """Wall seconds per decode step with b requests in flight (per token of the batch); prompt seconds per token.

        Per b, after a warm-up round (connections opened, a lazily loaded model loaded), a short
        and a long round (``COST_TOKENS`` and 4× as many tokens asked): a decode step is the
        slope, (long wall − short wall) / (long steps − short steps), which cancels the round
        trip and the prompt's prefill; what a round costs beyond its steps is the prompt's,
        per prompt token (the round trip included: a client pays it too)."""
        messages = [{"role": "user", "content": cp.problem.user_message}]
        prompt_tokens = self._chat(messages, 0.0, 1.0, None, 1, timed=True)[2]
        out = []
        for b in sizes:
            self._round(messages, b, 1)  # warm-up
            short_wall, short_steps, _ = self._round(messages, b, COST_TOKENS)
            long_wall, long_steps, tokens = self._round(messages, b, 4 * COST_TOKENS)
            if long_steps > short_steps and long_wall > short_wall:
                step_s = (long_wall - short_wall) / (long_steps - short_steps)
            else:  # replies too short to tell a step from the round trip: the whole round per step (an upper bound)
                log.warning("endpoint %s, %d in flight: replies of %d and %d tokens cannot separate a decode step "
                            "from the round trip; priced at the whole round", self.endpoint.base_url, b,
                            short_steps, long_steps)  # fmt: skip
                step_s = long_wall / max(1, long_steps)
            prompt_s = max(0.0, short_wall - step_s * short_steps) / max(1, prompt_tokens)
            out.append(BatchCost(self.model_name, b, step_s / b, prompt_s, tokens,
                                 f"endpoint {self.endpoint.base_url} (client on {machine.cpu_model()})"))  # fmt: skip
        return out

    def generate(self, cp: CascadeProblem, n_samples: int, test_ls: Sequence[int], max_tokens: int,
                 top_p: float, only: frozenset[GenerationKey] | None = None) -> list[StoredGeneration]:  # fmt: skip
        """Every answer and test of one problem (``only``: just these (kind, l, sample)), the requests in
        flight ``concurrency`` at a time."""
        plan: list[tuple[str, int, int, list[dict], int]] = []  # (kind, l, sample, messages, max tokens)
        answer = [{"role": "user", "content": cp.problem.user_message}]
        plan += [("answer", 0, s, answer, max_tokens) for s in range(-1, n_samples)]
        for n_lines in test_ls:
            tp = self_test_prompt(cp, n_lines, "chat")
            messages = [{"role": "user", "content": tp.messages[0]["content"] + TEST_REPLY_FORM}]
            # a chat reply is not started for the model: room for a preamble and the opening fence
            plan += [("test", n_lines, s, messages, tp.max_tokens + TEST_EXTRA_TOKENS) for s in range(-1, n_samples)]
        if only is not None:
            plan = [item for item in plan if item[:3] in only]

        def request(item):
            _, _, sample, messages, limit = item
            greedy = sample < 0
            return self._chat(messages, 0.0 if greedy else SAMPLE_TEMPERATURE, 1.0 if greedy else top_p,
                              None if greedy else sample, limit)  # fmt: skip

        t0 = time.perf_counter()
        replies = list(self._pool.map(request, plan))
        wall = time.perf_counter() - t0
        total_tokens = max(1, sum(r[1] for r in replies))
        rows = []
        for (kind, n_lines, sample, _, _), (reply, tokens, prompt_tokens, finish, _) in zip(plan, replies):
            text = answer_completion(cp, reply) if kind == "answer" else f"{FENCE}{first_code_block(reply)}\n```"
            rows.append(
                StoredGeneration(
                    model=self.model_name, dataset=cp.dataset, task_id=cp.task_id, kind=kind, l=n_lines,
                    sample=sample, temperature=0.0 if sample < 0 else SAMPLE_TEMPERATURE,
                    top_p=1.0 if sample < 0 else top_p, prompt_tokens=prompt_tokens, tokens=tokens, text=text,
                    finish_reason=finish, cost_s=round(wall * tokens / total_tokens, 6),  # the problem's wall, shared
                    decode_s=0.0, prefill_s=0.0, batch_size=float(self.concurrency),
                )
            )  # fmt: skip
        return rows


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
