"""llama-cpp-python's prompt-lookup decoding (``LlamaPromptLookupDecoding``) as a peer.

The library drafts by n-gram lookup in the prompt and verifies inside
``Llama.generate``; it needs its own ``Llama`` object (``draft_model=`` is a
constructor argument and forces ``logits_all``), so this peer loads a second copy
of the target's GGUF file.
"""

from __future__ import annotations

import os
import time

from codeaccel.decoding.generation import Generation, Request, StopChecker, validate_request
from codeaccel.engines.base import Engine
from codeaccel.errors import UserError


class LlamaPromptLookupMethod:
    name = "prompt-lookup"

    def __init__(self, target: Engine, num_pred_tokens: int = 10, max_ngram_size: int = 2):
        model_path = getattr(target, "model_path", None)
        if target.kind != "llama.cpp" or model_path is None:
            raise UserError("llama.cpp prompt lookup needs the llama.cpp engine")
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.target = target  # for tokens, EOG and context checks
        self.settings = {"num_pred_tokens": num_pred_tokens, "max_ngram_size": max_ngram_size}
        self.variant = f"llama-cpp-python, n={num_pred_tokens}"
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=target.n_ctx,
            n_threads=os.cpu_count(),
            n_threads_batch=os.cpu_count(),
            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=num_pred_tokens, max_ngram_size=max_ngram_size),
            # a draft model makes Llama keep logits for every position, but 0.3.36 sizes that buffer from the
            # logits_all *argument* (n_batch rows when False): past n_batch tokens generate() fails to broadcast
            logits_all=True,
            verbose=False,
        )

    def generate(self, request: Request) -> Generation:
        prompt_tokens, params, stop = request.prompt_tokens, request.params, request.stop
        max_tokens = validate_request(self.target, prompt_tokens, request.max_tokens)
        checker = StopChecker(self.target, stop, max_tokens)
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        self.llm.reset()  # generate(reset=True) alone keeps the longest common prefix: another problem's cache
        t0 = time.perf_counter()
        t1 = None
        tokens = self.llm.generate(
            list(prompt_tokens),
            temp=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        for token in tokens:
            if t1 is None:
                t1 = time.perf_counter()  # the prompt is evaluated and the first token sampled
            if checker.push(token):
                break
        tokens.close()
        t2 = time.perf_counter()
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason or "length",
            stop_string=checker.stop_string,
            n_prompt_tokens=len(prompt_tokens),
            prefill_s=(t1 or t2) - t0,
            decode_s=t2 - (t1 or t2),
        )

    def close(self) -> None:
        self.llm.close()
