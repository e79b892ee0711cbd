"""transformers' own speed-ups as peers: assisted generation and prompt lookup.

Both go through ``model.generate`` of the target loaded by the hf engine:
``assistant_model=`` (a draft model, transformers' adaptive draft length) or
``prompt_lookup_num_tokens=`` (n-gram lookup in the prompt). The output tokens then
pass through the same :class:`StopChecker` as every other method.
"""

from __future__ import annotations

import time

from codeaccel.decoding.generation import Generation, Request, StopChecker, validate_request
from codeaccel.engines.base import Engine
from codeaccel.errors import UserError


class _PromptClock:
    """Times the first forward call of each model in a ``generate()``: the ones that read the prompt.

    transformers fuses the target's prefill with its first verification (prompt +
    candidates in one call) and the assistant prefills inside its first draft, so the
    time to the first streamed token would count a whole draft-and-verify round as
    prefill. Timing the models' first calls instead gives the same split as the other
    methods: prefill = the target's and the draft's passes over the prompt.
    """

    def __init__(self, *models) -> None:
        self.prefill_s = 0.0
        self._handles = []
        for model in {id(m): m for m in models}.values():  # one module passed twice is timed once
            started: list[float] = []

            def pre(module, args, started=started):
                if not started:
                    started.append(time.perf_counter())

            def post(module, args, output, started=started):
                if len(started) == 1:
                    started.append(time.perf_counter())
                    self.prefill_s += started[1] - started[0]

            self._handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]

    def __enter__(self) -> "_PromptClock":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


class HFGenerateMethod:
    """``model.generate`` with one of transformers' candidate generators."""

    def __init__(self, name: str, target: Engine, generate_kwargs: dict, assistant: Engine | None = None):
        if target.kind != "hf":
            raise UserError(f"method {name!r} runs transformers' generate: it needs --engine hf")
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
        input_ids = torch.tensor([list(prompt_tokens)], dtype=torch.long)
        models = [self.target.model] + ([self.assistant.model] if self.assistant is not None else [])
        with _PromptClock(*models) as clock, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.target.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                # not stop_strings=: assisted generation forwards those to the assistant without a tokenizer
                stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))]) if stop else None,
                repetition_penalty=1.0,
                pad_token_id=tokenizer.eos_token_id,
                **sampling,
                **self.generate_kwargs,
            )
            total_s = time.perf_counter() - t0
        checker = StopChecker(self.target, stop, max_tokens)
        for token in out[0, len(prompt_tokens) :].tolist():
            if checker.push(token):
                break
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason or "length",
            stop_string=checker.stop_string,
            n_prompt_tokens=len(prompt_tokens),
            prefill_s=clock.prefill_s,
            decode_s=total_s - clock.prefill_s,
        )

    def close(self) -> None:
        pass  # the assistant engine belongs to the EnginePool that loaded it
