"""``codeaccel generate``: one completion, printed, with its timing (and its drafting, for drafting methods)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.cli import options as opt
from codeaccel.cli.display import err, out
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.engines.pool import EnginePool
from codeaccel.errors import UserError
from codeaccel.methods.registry import MethodOptions, build_method, parse_methods


@opt.with_method_flags
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    model: opt.ModelOpt = opt.DEFAULT_MODEL,
    engine: opt.EngineOpt = "llama.cpp",
    max_tokens: opt.MaxTokensOpt = 256,
    temperature: opt.TemperatureOpt = 0.0,
    top_p: opt.TopPOpt = 1.0,
    top_k: opt.TopKOpt = 0,
    seed: opt.SeedOpt = None,
    stop: opt.StopOpt = None,
    chat: opt.ChatOpt = True,
    dtype: opt.DtypeOpt = "bfloat16",
    method: opt.MethodOpt = "autoregressive",
    prediction: Annotated[
        Optional[str],
        typer.Option(
            help="Expected output (OpenAI's predicted outputs: e.g. the code an edit starts from), "
            "@FILE to read it from a file (@@ for text that starts with @); drafting methods verify it first.",
        ),
    ] = None,
    *,
    options: MethodOptions,  # the method flags, given by opt.with_method_flags
) -> None:
    """Generate a completion and print it, with its timing."""
    if prompt == "-":
        prompt = opt.read_stdin_text()
    if not prompt.strip():
        raise UserError("the prompt is empty")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if stop and not all(stop):
        raise UserError("--stop is empty: give the text to stop at")
    methods = parse_methods(",".join(opt.comma_list(method, "--method")))
    if len(methods) != 1:
        raise UserError(f"--method: generate runs one method, got {method!r} (compare several with codeaccel bench)")
    (method,) = methods
    opt.check_dtype(dtype)
    expected = _read_prediction(prediction)
    with load_engine(model, engine, dtype=dtype) as eng, EnginePool() as pool:
        text = eng.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        runner = build_method(method, eng, options, pool)
        try:
            predicted = eng.tokenize(expected) if expected else ()
            request = Request(eng.tokenize(text), params, max_tokens, tuple(stop or ()), prediction_tokens=predicted)
            gen = runner.generate(request)
        finally:
            runner.close()
    out.print(gen.text, markup=False, highlight=False, soft_wrap=True)
    err.print(
        f"[dim]{gen.n_prompt_tokens} prompt tokens, prefill {1000 * gen.prefill_s:.0f} ms; "
        f"{gen.n_generated} tokens in {gen.decode_s:.2f} s = {gen.tokens_per_s:.1f} tok/s; "
        f"finish: {gen.finish_reason}[/dim]"
    )
    spec = gen.stats.speculation if gen.stats is not None else None
    if spec is not None:
        chosen = {str(k): n for k, n in sorted(spec.chosen_k.items())}
        mean_len = None if spec.mean_accepted_len is None else round(spec.mean_accepted_len, 4)
        err.print(
            f"[dim]{spec.drafts} drafts in {gen.stats.steps} target steps, {spec.accepted_tokens}/"
            f"{spec.drafted_tokens} draft tokens accepted, mean accepted length {mean_len}, "
            f"k chosen {chosen}; target {1000 * gen.stats.target_s / max(1, gen.n_generated):.1f} ms/token[/dim]"
        )


def _read_prediction(prediction: str | None) -> str | None:
    """The --prediction text: as given, read from the file after '@', or '@@...' for text starting with '@'."""
    if prediction is None or not prediction.startswith("@"):
        return prediction
    if prediction.startswith("@@"):  # a decorator, say: "@@property" is the text "@property"
        return prediction[1:]
    return opt.read_text_file(Path(prediction[1:]), "the prediction file")
