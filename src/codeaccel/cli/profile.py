"""``codeaccel profile``: measure and save an engine's cost curve (k tokens at once vs one decode step)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.cli.display import out, print_cost_curve
from codeaccel.cli.options import DtypeOpt, EngineOpt, check_dtype, check_folder, command_line
from codeaccel.engines import load_engine
from codeaccel.engines.cost_curve import measure_cost_curve, save_cost_curve
from codeaccel.errors import UserError
from codeaccel.methods.registry import MIN_DRAFT_VOCAB, ranked_draft_vocabulary


def profile(
    model: Annotated[str, typer.Argument(help="Bundled model name, GGUF file or HF directory.")],
    engine: EngineOpt = "llama.cpp",
    k_max: Annotated[int, typer.Option(help="Largest batch of tokens to time.")] = 32,
    repeats: Annotated[int, typer.Option(help="Timings per k (the median is kept).")] = 5,
    context: Annotated[int, typer.Option(help="Tokens already in the cache when timing.")] = 256,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Also write JSON/MD/PNG into this folder.")] = None,
    dtype: DtypeOpt = "bfloat16",
    draft_vocab: Annotated[
        Optional[int],
        typer.Option(
            help="Profile the model with only this many output tokens, as --draft-vocab drafts with it "
            "(the curve is saved under <model>-vocab<N> for inspection; drafting reads the target's curve)."
        ),
    ] = None,
) -> None:
    """Measure the cost of evaluating k tokens at once, relative to one decode step."""
    if k_max < 1 or repeats < 1 or context < 1:
        raise UserError("--k-max, --repeats and --context must be >= 1")
    check_dtype(dtype)
    check_folder(out_dir)
    vocabulary = None
    if draft_vocab is not None:
        if engine != "llama.cpp":
            raise UserError("--draft-vocab needs the llama.cpp engine")
        if draft_vocab < MIN_DRAFT_VOCAB:
            raise UserError(f"--draft-vocab needs at least {MIN_DRAFT_VOCAB} tokens, got {draft_vocab}")
        with load_engine(model, engine, dtype=dtype) as full:  # its tokenizer finds the general datastore
            vocabulary = ranked_draft_vocabulary(full, model, draft_vocab, engine)
    with load_engine(model, engine, dtype=dtype, vocabulary=vocabulary) as eng:
        curve = measure_cost_curve(eng, k_max=k_max, repeats=repeats, context_tokens=context, dtype=dtype)
    paths = save_cost_curve(curve, out_dir, command=command_line())
    print_cost_curve(curve)
    for p in paths:
        out.print(f"saved {p}")
