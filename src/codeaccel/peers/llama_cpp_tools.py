"""llama.cpp's own C++ speculative decoder (``llama-speculative-simple``) as a peer.

The tool is built by ``make llama-tools`` from the llama.cpp tree vendored in the same
llama-cpp-python sdist (same CPU flags). It is found in ``$CODEACCEL_LLAMA_TOOLS`` (a
directory) or else in ``<repo root>/build/llama.cpp/bin``, where the repo root is the
first directory above this file that holds both a ``Makefile`` and ``src/codeaccel``
(an editable install; a wheel installed elsewhere falls back to the working directory).

One subprocess per request, on the same prompt tokens and token limit as our methods:
the prompt is our tokens detokenized, given with ``-f`` (the tool drops one trailing
newline from a prompt file, so one is added) and ``--no-escape``; the tool tokenizes it
with special tokens parsed and, for these GGUFs, no BOS, and the prompt token count it
reports must equal ours (else :class:`InternalError`). ``-n max_tokens - 1``: the tool
samples one token past its limit, so it stops at exactly ``max_tokens``. The target is
the target engine's GGUF, ``-c`` its context, ``-t``/``-tb`` ``os.cpu_count()``;
sampling is ``--samplers temperature;top_k;top_p`` with the request's temperature,
top-k, top-p and seed (temperature 0 is greedy: argmax), our order and nothing else.

The tool does not know stop strings: it runs to its own EOS or the limit. Its output
text is cut the way our methods cut theirs: ``target.tokenize(text)`` goes through
:class:`~codeaccel.decoding.generation.StopChecker` (EOS, stop strings, max tokens). The
tool does not print its EOS token; when it decoded fewer tokens than its limit, it ended
on one, and the engine's EOS token is appended (an EOS as its very last allowed token
reads as ``length``).

Timing: the peer is timed as it reports its own decode speed ("decoded N tokens in S
seconds, speed: X t/s", the tokens it decoded, before our stop-string cut), so
``decode_s`` is set such that :attr:`Generation.tokens_per_s` equals X; its prompt time
(``prefill_s``) is its own "encoded" time (prompt evaluation plus its speculator's
set-up). Model loading is not counted. The draft statistics it prints (n_draft,
n_drafted, n_accept, accept rate) come with the generation from
:meth:`LlamaCppToolMethod.run`; ``Generation.stats`` is None, as for every peer.

Each speculation type runs with the tool's defaults (tuned for GPUs: ngram-simple
looks up 12 tokens and drafts 48) and, as ``-tuned``, with settings tuned on this
2-core CPU (:data:`TUNED`; the grid and its results are in
``docs/benchmarks/llama_cpp_tools/tuning.md``). ngram-cache exposes no draft setting to
this tool (8 tokens, hard-coded), so its tuned variant tunes the engine instead (flash
attention off). The tool's logger prints from a thread it does not wait for at exit, so
a run whose output comes back cut short (no closing lines) is run again (at most
:data:`ATTEMPTS` times). Text that is not valid UTF-8 (a character cut at the token
limit) is retokenized from its replacement characters.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeaccel.decoding.generation import Generation, Request, StopChecker, validate_request
from codeaccel.engines.base import Engine
from codeaccel.errors import InternalError, SetupError, UserError
from codeaccel.models.registry import resolve_model

TOOL = "llama-speculative-simple"
ENV_DIR = "CODEACCEL_LLAMA_TOOLS"
SPEC_TYPES = ("ngram-simple", "ngram-mod", "ngram-cache", "draft-simple")
DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"  # draft-simple's -md unless --draft-model names another GGUF
TOOL_TIMEOUT_S = 1800  # one request, model load included: far past any benchmark problem here
ATTEMPTS = 3  # runs of the tool per request when its output comes back cut short (see _complete)
DEFAULT_BATCH = 2048  # the tool's -b; a longer prompt raises it (the prompt is evaluated in one batch)

# Flags tuned on this CPU (2 cores, HumanEval, 1.5B target): docs/benchmarks/llama_cpp_tools/tuning.md.
TUNED: dict[str, dict[str, int | float | str]] = {
    # m >= n: the tool drafts only when it can copy at least n tokens; (4, 3) never drafts
    "ngram-simple": {"--spec-ngram-simple-size-n": 3, "--spec-ngram-simple-size-m": 3},
    "ngram-mod": {"--spec-ngram-mod-n-match": 8, "--spec-ngram-mod-n-min": 2, "--spec-ngram-mod-n-max": 8},
    "ngram-cache": {"--flash-attn": "off"},  # its 8-token drafts are fixed; the 9-token verifications run faster
    "draft-simple": {"--spec-draft-n-max": 3, "--spec-draft-p-min": 0.6},  # stop drafting where the draft is unsure
}

LLAMA_CPP_TOOL_METHODS = tuple(f"llama.cpp-{t}{s}" for t in SPEC_TYPES for s in ("", "-tuned"))

_FLOAT = r"([-+]?(?:\d+(?:\.\d*)?|nan|inf))"
_ENCODED = re.compile(rf"encoded\s+(\d+) tokens in\s+{_FLOAT} seconds, speed:\s+{_FLOAT} t/s")
_DECODED = re.compile(rf"decoded\s+(\d+) tokens in\s+{_FLOAT} seconds, speed:\s+{_FLOAT} t/s")
_COUNTERS = {key: re.compile(rf"^.*\b{key}\s*=\s*(\d+)\s*$", re.M) for key in ("n_draft", "n_drafted", "n_accept")}
_ACCEPT = re.compile(rf"^.*\baccept\s*=\s*{_FLOAT}%", re.M)


def repo_root() -> Path:
    """The checkout this package runs from (a ``Makefile`` next to ``src/codeaccel``), else the working directory."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "Makefile").is_file() and (parent / "src" / "codeaccel").is_dir():
            return parent
    return Path.cwd()


def tools_dir() -> Path:
    """Where the llama.cpp binaries are: ``$CODEACCEL_LLAMA_TOOLS``, else ``<repo root>/build/llama.cpp/bin``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else repo_root() / "build" / "llama.cpp" / "bin"


def tool_path(name: str = TOOL) -> Path:
    path = tools_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SetupError(f"llama.cpp's {name} is not built ({path} is missing): run `make llama-tools`")
    return path


@dataclass(frozen=True)
class ToolReport:
    """What one run of the tool printed: its text and its own statistics."""

    text: str  # the generated text (the tool omits its EOS token)
    n_prompt: int  # "encoded N tokens": the prompt as the tool tokenized it
    prompt_s: float
    n_decoded: int  # "decoded N tokens": tokens it accepted, up to the end of the batch that held its EOS
    decode_s: float
    decode_tokens_per_s: float
    n_draft: int | None = None  # its --spec-draft-n-max (printed whatever the speculation type)
    n_drafted: int | None = None
    n_accept: int | None = None
    accept_rate: float | None = None  # n_accept / n_drafted (None when nothing was drafted)


def parse_output(stdout: bytes, stderr: str, prompt: str) -> ToolReport:
    """Parse the tool's output: stdout is ``\\n\\n`` + the prompt + the generated text + ``\\n\\n\\n\\n``,
    the statistics are lines on stderr."""
    head = b"\n\n" + prompt.encode("utf-8")
    if not stdout.startswith(head):
        raise InternalError(f"{TOOL} did not echo the prompt it was given: its output cannot be split from it")
    body = stdout[len(head) :]
    if body.endswith(b"\n\n\n\n"):
        body = body[:-4]
    encoded, decoded = _ENCODED.search(stderr), _DECODED.search(stderr)
    if encoded is None or decoded is None:
        raise InternalError(f"{TOOL} printed no 'encoded'/'decoded' statistics line: its output format changed")
    counters = {key: int(m.group(1)) if (m := rx.search(stderr)) else None for key, rx in _COUNTERS.items()}
    accept = _ACCEPT.search(stderr)
    rate = float(accept.group(1)) / 100 if accept else None
    return ToolReport(
        text=body.decode("utf-8", errors="replace"),
        n_prompt=int(encoded.group(1)),
        prompt_s=float(encoded.group(2)),
        n_decoded=int(decoded.group(1)),
        decode_s=float(decoded.group(2)),
        decode_tokens_per_s=float(decoded.group(3)),
        accept_rate=None if rate is None or math.isnan(rate) else rate,
        **counters,
    )


def _complete(stdout: bytes, stderr: str) -> bool:
    """Whether the tool's logger printed everything: it writes from a thread the tool does not wait for at
    exit, so a fast exit can drop the last lines; its last line is the closing ``\\n\\n`` on stdout."""
    return stdout.endswith(b"\n\n\n\n") and _DECODED.search(stderr) is not None and _ACCEPT.search(stderr) is not None


def _eos_token(target: Engine) -> int:
    """The engine's EOS token (what a chat turn ends with), else its smallest end-of-generation token."""
    llm = getattr(target, "llm", None)
    eos = llm.token_eos() if llm is not None else None
    return eos if eos in target.eog_token_ids else min(target.eog_token_ids)


def _sampling_flags(request: Request) -> list[str]:
    params = request.params
    flags = ["--samplers", "temperature;top_k;top_p", "--temp", repr(float(params.temperature))]
    flags += ["--top-k", str(params.top_k), "--top-p", repr(float(params.top_p))]
    if params.seed is not None:
        flags += ["--seed", str(params.seed)]
    return flags


class LlamaCppToolMethod:
    """``llama.cpp-<spec type>[-tuned]``: one run of ``llama-speculative-simple`` per request."""

    def __init__(self, target: Engine, spec_type: str, tuned: bool = False, draft_model: str | None = None):
        if spec_type not in SPEC_TYPES:
            raise UserError(f"unknown llama.cpp speculation type {spec_type!r}: choose from {', '.join(SPEC_TYPES)}")
        self.name = f"llama.cpp-{spec_type}" + ("-tuned" if tuned else "")
        model_path = getattr(target, "model_path", None)
        if target.kind != "llama.cpp" or model_path is None:
            raise UserError(f"method {self.name!r} runs llama.cpp's own C++ decoder: it needs --engine llama.cpp")
        self.target = target  # tokens, EOS and context checks
        self.binary = tool_path()
        self.spec_type = spec_type
        self.flags: dict[str, int | float | str] = dict(TUNED[spec_type]) if tuned else {}
        self.settings: dict = {"tool": TOOL, "spec_type": spec_type}
        self.settings.update({flag.lstrip("-"): value for flag, value in self.flags.items()})
        self.draft_path: Path | None = None
        if spec_type == "draft-simple":
            source = resolve_model(draft_model or DRAFT_MODEL)
            if source.kind != "gguf":
                raise UserError(f"{self.name} drafts with a GGUF model; {source.path} is a {source.kind} model")
            self.draft_path = source.path
            self.settings["draft_model"] = source.name
        shown = [f"{k}={v}" for k, v in self.settings.items() if k not in ("tool", "spec_type")]
        self.variant = ", ".join([f"llama.cpp {spec_type}" + ("" if tuned else " defaults"), *shown])

    def command(self, prompt_file: Path, n_prompt: int, max_tokens: int, request: Request) -> list[str]:
        threads = str(os.cpu_count() or 1)
        cmd = [str(self.binary), "-m", str(self.target.model_path), "-f", str(prompt_file), "--no-escape"]
        # -n 0 would mean "no limit" to the tool: one token is asked as -n 1 and cut by the StopChecker
        cmd += [
            "-n",
            str(max(1, max_tokens - 1)),
            "-c",
            str(self.target.n_ctx),
            "-t",
            threads,
            "-tb",
            threads,
            "-co",
            "off",
        ]
        if n_prompt > DEFAULT_BATCH:
            cmd += ["-b", str(n_prompt)]
        cmd += ["--spec-type", self.spec_type]
        if self.draft_path is not None:
            cmd += ["-md", str(self.draft_path)]
        for flag, value in self.flags.items():
            cmd += [flag, str(value)]
        return cmd + _sampling_flags(request)

    def run_tool(self, request: Request, max_tokens: int) -> ToolReport:
        prompt = self.target.detokenize(request.prompt_tokens)
        # LLAMA_ARG_* would change the tool's settings unseen, LLAMA_LOG_* its output format
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
        with tempfile.TemporaryDirectory(prefix="codeaccel-llama-") as tmp:
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_bytes(prompt.encode("utf-8") + b"\n")  # -f drops one trailing newline
            cmd = self.command(prompt_file, len(request.prompt_tokens), max_tokens, request)
            for _ in range(ATTEMPTS):
                try:
                    proc = subprocess.run(cmd, capture_output=True, env=env, check=False, timeout=TOOL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise SetupError(f"{TOOL} ran past {TOOL_TIMEOUT_S} s on one request (hung?)") from None
                stderr = proc.stderr.decode("utf-8", errors="replace")
                if proc.returncode != 0:
                    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
                    raise SetupError(f"{TOOL} failed (exit {proc.returncode}): {last.strip()}")
                if _complete(proc.stdout, stderr):
                    break
            else:
                raise InternalError(f"{TOOL}'s output was cut short {ATTEMPTS} times: its logger lost its last lines")
        report = parse_output(proc.stdout, stderr, prompt)
        if report.n_prompt != len(request.prompt_tokens):
            raise InternalError(
                f"{TOOL} tokenized the prompt into {report.n_prompt} tokens, ours has {len(request.prompt_tokens)}: "
                "it would not continue the same prompt"
            )
        return report

    def generate(self, request: Request) -> Generation:
        return self.run(request)[0]

    def run(self, request: Request) -> tuple[Generation, ToolReport]:
        """The generation, and what the tool printed about it (its own draft statistics)."""
        max_tokens = validate_request(self.target, request.prompt_tokens, request.max_tokens)
        report = self.run_tool(request, max_tokens)
        checker = StopChecker(self.target, request.stop, max_tokens)
        for token in self.target.tokenize(report.text):
            if checker.push(token):
                break
        if checker.finish_reason is None and report.n_decoded < max_tokens:
            checker.push(_eos_token(self.target))  # it stopped before its limit: on its (unprinted) EOS
        speed = report.decode_tokens_per_s
        generation = Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason or "length",
            stop_string=checker.stop_string,
            n_prompt_tokens=len(request.prompt_tokens),
            prefill_s=report.prompt_s,
            decode_s=len(checker.tokens) / speed if speed > 0 and math.isfinite(speed) else 0.0,
        )
        return generation, report

    def close(self) -> None:
        pass


def llama_cpp_tool(spec_type: str, tuned: bool = False) -> Callable[[Engine, Any, Any], LlamaCppToolMethod]:
    """A method builder ``(target, options, pool) -> method``; ``options.draft_model``: draft-simple's draft."""

    def build(target: Engine, options: Any, pool: Any) -> LlamaCppToolMethod:
        return LlamaCppToolMethod(target, spec_type, tuned, draft_model=getattr(options, "draft_model", None))

    return build
