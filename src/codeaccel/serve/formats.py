"""Response bodies and stream chunks: OpenAI's completion and chat shapes, llama-server's native shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from codeaccel.serve.completions import Call, ChoiceDelta, ChoiceResult, openai_finish_reason
from codeaccel.serve.scheduler import Finished

LLAMA_STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit"}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(finished: list[Finished], n_prompts_tokens: int, prompt_of: Sequence[int] | None = None) -> dict:
    """OpenAI's ``usage``: ``n_prompts_tokens`` counts each prompt once; ``prompt_of[i]``, the prompt of
    ``finished[i]`` (default: one prompt), so that cached tokens are counted once per prompt too (its most
    cached choice), summed over a list of prompts."""
    completion = sum(f.generation.n_generated for f in finished)
    per_prompt: dict[int, int] = {}
    for p, f in zip(prompt_of if prompt_of is not None else [0] * len(finished), finished):
        per_prompt[p] = max(per_prompt.get(p, 0), f.generation.n_cached_prompt_tokens)
    cached = sum(per_prompt.values())
    return {"prompt_tokens": n_prompts_tokens, "completion_tokens": completion,
            "total_tokens": n_prompts_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def timings(f: Finished) -> dict:
    """llama-server's ``timings`` object (and ours: queue and time to first token)."""
    g = f.generation
    evaluated = g.n_prompt_tokens - g.n_cached_prompt_tokens  # as llama-server: prompt_n excludes the cache
    return {
        "cache_n": g.n_cached_prompt_tokens,
        "prompt_n": evaluated,
        "prompt_ms": 1000 * g.prefill_s,
        "prompt_per_second": evaluated / g.prefill_s if g.prefill_s > 0 else None,
        "predicted_n": g.n_generated,
        "predicted_ms": 1000 * g.decode_s,
        "predicted_per_second": g.tokens_per_s or None,
        "queue_ms": 1000 * f.queued_s,
        "first_token_ms": None if f.first_token_s is None else 1000 * f.first_token_s,
        "total_ms": 1000 * f.total_s,
    }


def _timings_all(results: list[ChoiceResult]) -> dict:
    return timings(max((r.finished for r in results), key=lambda f: f.total_s))


def _body(call: Call, model: str, kind: tuple[str, str], results: list[ChoiceResult], prompt_tokens: int,
          content: Callable[[ChoiceResult], dict], prompt_of: Sequence[int] | None = None) -> dict:  # fmt: skip
    """The final object of a completion or chat call: ``kind`` = (id prefix, object), ``content(r)`` the
    choice's own fields (``text`` or ``message``); ``prompt_of[index]``: a choice's prompt (default: one)."""
    prefix, obj = kind
    choices = [{"index": r.index, **content(r), "logprobs": None,
                "finish_reason": openai_finish_reason(r.finished.generation.finish_reason)}
               for r in results]  # fmt: skip
    return {"id": f"{prefix}-{call.id}", "object": obj, "created": call.created, "model": model, "choices": choices,
            "usage": usage([r.finished for r in results], prompt_tokens,
                           None if prompt_of is None else [prompt_of[r.index] for r in results]),
            "timings": _timings_all(results)}  # fmt: skip


def completion_body(call: Call, model: str, results: list[ChoiceResult], prompt_tokens: int, echo: list[str],
                    prompt_of: Sequence[int]) -> dict:  # fmt: skip
    return _body(call, model, ("cmpl", "text_completion"), results, prompt_tokens,
                 lambda r: {"text": echo[r.index] + r.finished.generation.text}, prompt_of)  # fmt: skip


def completion_chunk(call: Call, model: str, d: ChoiceDelta) -> dict:
    """A stream's chunk; a choice's last one carries its ``timings``, as llama-server's streams do."""
    choice = {"index": d.index, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
    chunk = {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created, "model": model,
             "choices": [choice]}  # fmt: skip
    return chunk if d.finished is None else {**chunk, "timings": timings(d.finished)}


def chat_body(call: Call, model: str, results: list[ChoiceResult], prompt_tokens: int) -> dict:
    return _body(call, model, ("chatcmpl", "chat.completion"), results, prompt_tokens,
                 lambda r: {"message": {"role": "assistant", "content": r.finished.generation.text}})  # fmt: skip


def chat_chunk(call: Call, model: str, index: int, delta: dict, finish_reason: str | None,
               finished: Finished | None = None) -> dict:  # fmt: skip
    """A stream's chunk; a choice's last one (``finished``) carries its ``timings``."""
    chunk = {"id": f"chatcmpl-{call.id}", "object": "chat.completion.chunk", "created": call.created,
             "model": model, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}  # fmt: skip
    return chunk if finished is None else {**chunk, "timings": timings(finished)}


def usage_chunk(call: Call, model: str, obj: str, finished: list[Finished], prompt_tokens: int,
                prompt_of: Sequence[int] | None = None) -> dict:  # fmt: skip
    prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"  # the id every other chunk of the stream carries
    return {"id": f"{prefix}-{call.id}", "object": obj, "created": call.created, "model": model, "choices": [],
            "usage": usage(finished, prompt_tokens, prompt_of)}  # fmt: skip


def native_body(model: str, f: Finished, prompt: str) -> dict:
    """llama-server's final ``/completion`` and ``/infill`` object."""
    g = f.generation
    return {
        "index": 0,
        "content": g.text,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": model,
        "tokens_predicted": g.n_generated,
        "tokens_evaluated": g.n_prompt_tokens,
        "prompt": prompt,
        "has_new_line": "\n" in g.text,
        "truncated": False,
        "stop_type": LLAMA_STOP_TYPE[g.finish_reason],
        "stopping_word": g.stop_string,
        "tokens_cached": g.n_prompt_tokens + g.n_generated,
        "timings": timings(f),
    }


def native_chunk(text: str) -> dict:
    return {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": 0}


def native_empty_body(model: str, n_prompt: int, prompt: str) -> dict:
    """llama-server's answer to ``n_predict: 0`` (a cache warm-up): no tokens, the prompt counted."""
    return {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": model,
            "tokens_predicted": 0, "tokens_evaluated": n_prompt, "prompt": prompt, "has_new_line": False,
            "truncated": False, "stop_type": "limit", "stopping_word": "", "tokens_cached": n_prompt,
            "timings": {"cache_n": n_prompt, "prompt_n": 0, "prompt_ms": 0.0, "predicted_n": 0,
                        "predicted_ms": 0.0}}  # fmt: skip


def verify_body(call: Call, model: str, session_id: str | None, f: Finished, n_context: int, full: bool) -> dict:
    """``/v1/verify``'s answer: the accepted draft tokens and the target's next token.

    finish_reason: "eos" when the target ended the text, "length" when the context is full, else None."""
    g = f.generation
    spec = g.stats.speculation if g.stats is not None else None
    reason = "eos" if g.finish_reason == "eos" else ("length" if full else None)
    return {
        "id": f"verify-{call.id}",
        "object": "verification",
        "created": call.created,
        "model": model,
        "session_id": session_id,
        "tokens": g.tokens,
        "n_drafted": spec.drafted_tokens if spec is not None else 0,
        "n_accepted": spec.accepted_tokens if spec is not None else 0,
        "finish_reason": reason,
        "usage": usage([f], n_context),
        "timings": timings(f),
    }
