"""The command line as a package: its entry points, its commands, and its errors mapped in one place."""

import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

import codeaccel.cli
from codeaccel.cli import app, main
from codeaccel.cli import models as models_cli
from codeaccel.errors import InternalError, SetupError, UserError

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_and_python_m_run_codeaccel_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"codeaccel": "codeaccel.cli:main"}
    assert codeaccel.cli.main is main and isinstance(app, typer.Typer)
    assert "from codeaccel.cli import main" in (ROOT / "src" / "codeaccel" / "__main__.py").read_text()


def test_every_command_is_registered_in_its_order():
    group = typer.main.get_group(app)
    assert list(group.commands) == [
        "generate",
        "profile",
        "bench",
        "serve",
        "loadtest",
        "client",
        "split-bench",
        "models",
        "index",
        "sandbox",
        "dataset",
        "cascade",
        "feedback",
        "draft",
    ]
    assert list(group.commands["cascade"].commands) == ["run", "tune", "report", "solve"]
    assert list(group.commands["dataset"].commands) == ["build-edits"]
    assert list(group.commands["models"].commands) == ["list", "fetch", "path"]
    assert list(group.commands["index"].commands) == ["build", "update", "stats", "bench"]
    assert list(group.commands["sandbox"].commands) == ["check", "bench"]


def test_importing_the_cli_loads_no_heavy_dependency():
    probe = "import sys, codeaccel.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for heavy in ("torch", "transformers", "llama_cpp", "matplotlib", "fastapi", "uvicorn"):
        assert f"'{heavy}'" not in loaded


@pytest.mark.parametrize(
    "error,code,line",
    [
        (UserError("no such thing"), 2, "error: no such thing"),
        (SetupError("install the part packages"), 2, "error: install the part packages"),
        (InternalError("not a tree"), 1, "internal error: not a tree (a bug: please report it)"),
    ],
)
def test_main_maps_each_kind_of_error_to_one_line_and_its_exit_code(monkeypatch, capsys, error, code, line):
    def fail(model):
        raise error

    monkeypatch.setattr(models_cli, "is_assembled", fail)
    monkeypatch.setattr(sys, "argv", ["codeaccel", "models", "list"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == code
    assert signal.getsignal(signal.SIGTERM) is before  # main's SIGTERM handler is its own, not the caller's
    lines = [text for text in capsys.readouterr().err.splitlines() if text.strip()]
    assert lines == [line]
