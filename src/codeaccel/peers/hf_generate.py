"""transformers' own speed-ups as peers: assisted generation and prompt lookup.

Both go through ``model.generate`` of the target loaded by the hf engine:
``assistant_model=`` (a draft model, transformers' adaptive draft length) or
``prompt_lookup_num_tokens=`` (n-gram lookup in the prompt). The output tokens then
pass through the same :class:`StopChecker` as every other method.
"""

from __future__ import annotations

import time

from codeaccel.engines.base import Engine
from codeaccel.errors import CodeaccelError
from codeaccel.generation import Generation, Request, StopChecker, validate_request


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (the end of the prefill)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt itself
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class HFGenerateMethod:
    """``model.generate`` with one of transformers' candidate generators."""

    def __init__(self, name: str, target: Engine, generate_kwargs: dict, assistant: Engine | None = None):
        if target.kind != "hf":
            raise CodeaccelError(f"method {name!r} runs transformers' generate: it needs --engine hf")
        self.name = name
        self.target = target
        self.assistant = assistant
        self.generate_kwargs = generate_kwargs
        self.settings = dict(generate_kwargs)
        if assistant is not None:
            self.generate_kwargs = {**generate_kwargs, "assistant_model": assistant.model}
            self.settings.update(draft_model=assistant.model_name, draft_engine=assistant.kind)
        self.variant = "transformers" + "".join(f", {k}={v}" for k, v in self.settings.items())

    def generate(self, request: Request) -> Generation:
        import torch
        from transformers import StoppingCriteriaList, StopStringCriteria

        prompt_tokens, params, stop = request.prompt_tokens, request.params, request.stop
        max_tokens = validate_request(self.target, prompt_tokens, request.max_tokens)
        tokenizer = self.target.tokenizer
        sampling = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
            if not params.greedy
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        clock = _FirstTokenClock()
        input_ids = torch.tensor([list(prompt_tokens)], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.target.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                # not stop_strings=: assisted generation forwards those to the assistant without a tokenizer
                stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))]) if stop else None,
                repetition_penalty=1.0,
                pad_token_id=tokenizer.eos_token_id,
                streamer=clock,
                **sampling,
                **self.generate_kwargs,
            )
        t2 = time.perf_counter()
        checker = StopChecker(self.target, stop, max_tokens)
        for token in out[0, len(prompt_tokens) :].tolist():
            if checker.push(token):
                break
        t1 = clock.first_token_at or t2
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason or "length",
            n_prompt_tokens=len(prompt_tokens),
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
        )

    def close(self) -> None:
        pass  # the assistant engine belongs to the EnginePool that loaded it
