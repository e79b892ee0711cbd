"""llama.cpp's C++ speculative decoder as a peer: a fake llama-speculative-simple in the real tool's output
format (no binary needed), and one realmodel check against the built tool."""

import json
import stat
import sys

import pytest

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.harness import build_prompt
from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.generation import Request, StopChecker
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.engines.pool import EnginePool
from codeaccel.errors import InternalError, SetupError, UserError
from codeaccel.methods.registry import BUILDERS, MethodOptions, build_method, uses_cost_curve
from codeaccel.peers import llama_cpp_tools
from codeaccel.peers.llama_cpp_tools import LLAMA_CPP_TOOL_METHODS, TUNED, LlamaCppToolMethod, parse_output

PROMPT = "<|im_start|>user\nWrite add.<|im_end|>\n<|im_start|>assistant\n```python\n"
TEXT = "def add(a, b):\n    return a + b\n```\n\nThis adds two numbers."

# stderr of the real tool (llama-speculative-simple, llama.cpp in llama-cpp-python 0.3.36), statistics part
STDERR = """\
encoded   27 tokens in    0.312 seconds, speed:   86.538 t/s
decoded   40 tokens in    2.000 seconds, speed:   20.000 t/s

n_draft   = 48
n_predict = 40
n_drafted = 30
n_accept  = 12
accept    = 40.000%

draft:

statistics     ngram-simple: #calls(b,g,a) =    1     28      4, #gen drafts =      4, #acc drafts =     3
"""

# The fake tool: echoes the prompt (as the real one does), prints the configured text and statistics, and
# records its command line; its config (text, counts, speed, exit code) is a JSON file next to it.
FAKE = """\
import json, pathlib, sys
here = pathlib.Path(sys.argv[0]).resolve().parent
cfg = json.loads((here / "config.json").read_text())
(here / "argv.json").write_text(json.dumps(sys.argv[1:]))
args = sys.argv[1:]
prompt = pathlib.Path(args[args.index("-f") + 1]).read_bytes()
if prompt.endswith(b"\\n"):
    prompt = prompt[:-1]
if cfg.get("exit"):
    sys.stderr.write("main: error: failed to load model\\n")
    sys.exit(cfg["exit"])
runs = here / "runs"
runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
if int(runs.read_text()) <= cfg.get("cut", 0):  # its logger lost the last lines: no statistics, no closing lines
    sys.stdout.buffer.write(b"\\n\\n" + prompt + cfg["text"].encode()[:3])
    sys.exit(0)
sys.stdout.buffer.write(b"\\n\\n" + prompt + cfg["text"].encode() + b"\\n\\n" + b"\\n\\n")
n, s = cfg["n_decoded"], cfg["decode_s"]
sys.stderr.write(
    "build: 1 (0c1e570) with GNU 12.2.0 for Linux x86_64\\n"
    f"encoded {cfg['n_prompt']:4d} tokens in {0.25:8.3f} seconds, speed: {cfg['n_prompt'] / 0.25:8.3f} t/s\\n"
    f"decoded {n:4d} tokens in {s:8.3f} seconds, speed: {n / s:8.3f} t/s\\n\\n"
    "n_draft   = 48\\nn_predict = %d\\nn_drafted = 30\\nn_accept  = 12\\naccept    = 40.000%%\\n" % n
)
"""


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    """The fake binary in a directory named by CODEACCEL_LLAMA_TOOLS; returns a function that configures it."""
    tool = tmp_path / "llama-speculative-simple"
    tool.write_text(f"#!{sys.executable}\n{FAKE}")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CODEACCEL_LLAMA_TOOLS", str(tmp_path))

    def configure(**cfg):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return tmp_path

    return configure


@pytest.fixture(scope="module")
def target(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=512) as engine:
        yield engine


def argv(tool_dir) -> list[str]:
    return json.loads((tool_dir / "argv.json").read_text())


def test_parse_output_reads_the_text_after_the_echoed_prompt_and_the_statistics():
    stdout = b"\n\n" + PROMPT.encode() + TEXT.encode() + b"\n\n\n\n"
    report = parse_output(stdout, STDERR, PROMPT)
    assert report.text == TEXT
    assert (report.n_prompt, report.prompt_s) == (27, 0.312)
    assert (report.n_decoded, report.decode_s, report.decode_tokens_per_s) == (40, 2.0, 20.0)
    assert (report.n_draft, report.n_drafted, report.n_accept, report.accept_rate) == (48, 30, 12, 0.4)


def test_parse_output_refuses_output_it_cannot_split():
    with pytest.raises(InternalError, match="echo"):
        parse_output(b"\n\nanother prompt" + TEXT.encode(), STDERR, PROMPT)
    with pytest.raises(InternalError, match="statistics"):
        parse_output(b"\n\n" + PROMPT.encode() + TEXT.encode(), "n_accept = 3\n", PROMPT)


def test_parse_output_without_drafts_has_no_accept_rate():
    report = parse_output(b"\n\n" + PROMPT.encode(), STDERR.replace("40.000%", "-nan%"), PROMPT)
    assert report.text == "" and report.accept_rate is None


def test_output_is_cut_at_stop_strings_and_timed_at_the_tools_own_speed(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    tool_dir = fake_tool(text=TEXT, n_prompt=len(prompt), n_decoded=40, decode_s=2.0)
    method = LlamaCppToolMethod(target, "ngram-simple")
    out, report = method.run(Request(prompt, SamplingParams(), 100, stop=["\n```"]))
    expected = StopChecker(target, ["\n```"], 100)
    for token in target.tokenize(TEXT):
        if expected.push(token):
            break
    assert out.text == "def add(a, b):\n    return a + b" and out.finish_reason == "stop"
    assert out.tokens == expected.tokens and out.n_prompt_tokens == len(prompt)
    assert out.tokens_per_s == pytest.approx(20.0)  # the tool's reported decode speed
    assert out.prefill_s == pytest.approx(0.25) and out.stats is None
    assert report.accept_rate == pytest.approx(0.4)
    args = argv(tool_dir)
    assert args[args.index("--spec-type") + 1] == "ngram-simple" and "--no-escape" in args
    assert args[args.index("-n") + 1] == "99" and args[args.index("-c") + 1] == str(target.n_ctx)
    assert args[args.index("--temp") + 1] == "0.0"
    assert args[args.index("--samplers") + 1] == "temperature;top_k;top_p"
    assert args[args.index("-m") + 1] == str(target.model_path) and "--seed" not in args


def test_the_tool_stopping_before_its_limit_ended_on_eos(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    fake_tool(text="x = 1\n", n_prompt=len(prompt), n_decoded=5, decode_s=0.5)
    out = LlamaCppToolMethod(target, "ngram-mod").generate(Request(prompt, SamplingParams(), 100))
    assert out.finish_reason == "eos" and out.tokens[-1] in target.eog_token_ids
    assert out.text == "x = 1\n" and out.tokens[:-1] == target.tokenize("x = 1\n")


def test_the_tool_at_its_limit_ends_by_length(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    text = "x = 1\ny = 2\n"
    n = len(target.tokenize(text))
    fake_tool(text=text, n_prompt=len(prompt), n_decoded=n, decode_s=1.0)
    out = LlamaCppToolMethod(target, "ngram-cache").generate(Request(prompt, SamplingParams(), n))
    assert out.finish_reason == "length" and out.n_generated == n and out.text == text


def test_a_prompt_the_tool_tokenizes_differently_is_refused(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    fake_tool(text=TEXT, n_prompt=len(prompt) + 1, n_decoded=40, decode_s=2.0)  # e.g. a BOS added
    with pytest.raises(InternalError, match="tokenized the prompt"):
        LlamaCppToolMethod(target, "ngram-simple").generate(Request(prompt, SamplingParams(), 50))


def test_a_failing_tool_is_a_setup_error_with_its_message(target, fake_tool):
    fake_tool(exit=1)
    with pytest.raises(SetupError, match="failed to load model"):
        LlamaCppToolMethod(target, "ngram-simple").generate(Request(target.tokenize(PROMPT), SamplingParams(), 50))


def test_output_cut_short_by_the_tools_logger_is_run_again(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    tool_dir = fake_tool(text=TEXT, n_prompt=len(prompt), n_decoded=40, decode_s=2.0, cut=2)
    out = LlamaCppToolMethod(target, "ngram-simple").generate(Request(prompt, SamplingParams(), 100))
    assert (tool_dir / "runs").read_text() == "3" and out.text.startswith("def add(a, b):")
    (tool_dir / "runs").unlink()
    fake_tool(text=TEXT, n_prompt=len(prompt), n_decoded=40, decode_s=2.0, cut=3)
    with pytest.raises(InternalError, match="cut short 3 times"):
        LlamaCppToolMethod(target, "ngram-simple").generate(Request(prompt, SamplingParams(), 100))


def test_a_missing_binary_says_how_to_build_it(target, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_LLAMA_TOOLS", str(tmp_path / "nowhere"))
    with pytest.raises(SetupError, match="make llama-tools"):
        LlamaCppToolMethod(target, "ngram-simple")


def test_without_the_env_var_the_tools_are_in_the_checkouts_build_folder(monkeypatch):
    monkeypatch.delenv("CODEACCEL_LLAMA_TOOLS", raising=False)
    root = llama_cpp_tools.repo_root()
    assert (root / "Makefile").is_file() and (root / "src" / "codeaccel" / "peers" / "llama_cpp_tools.py").is_file()
    assert llama_cpp_tools.tools_dir() == root / "build" / "llama.cpp" / "bin"


def test_sampled_requests_pass_their_temperature_top_k_top_p_and_seed(target, fake_tool):
    prompt = target.tokenize(PROMPT)
    tool_dir = fake_tool(text=TEXT, n_prompt=len(prompt), n_decoded=40, decode_s=2.0)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    LlamaCppToolMethod(target, "ngram-simple", tuned=True).generate(Request(prompt, params, 64))
    args = argv(tool_dir)
    values = {flag: args[args.index(flag) + 1] for flag in ("--temp", "--top-k", "--top-p", "--seed")}
    assert values == {"--temp": "0.7", "--top-k": "20", "--top-p": "0.9", "--seed": "3"}
    for flag, value in TUNED["ngram-simple"].items():
        assert args[args.index(flag) + 1] == str(value)


def test_every_name_builds_on_llama_cpp_and_records_its_settings(target, fake_tool, tiny_gguf):
    fake_tool(text="", n_prompt=0, n_decoded=1, decode_s=1.0)
    assert len(LLAMA_CPP_TOOL_METHODS) == 8
    seen = {}
    with EnginePool() as pool:
        for name in LLAMA_CPP_TOOL_METHODS:
            assert name in BUILDERS and not uses_cost_curve(name)
            method = build_method(name, target, MethodOptions(draft_model=tiny_gguf), pool)
            spec_type = name.removeprefix("llama.cpp-").removesuffix("-tuned")
            assert method.name == name and method.settings["spec_type"] == spec_type
            if name.endswith("-tuned"):
                assert all(flag.lstrip("-") in method.settings for flag in TUNED[spec_type])
            if spec_type == "draft-simple":
                assert method.settings["draft_model"] == "tiny" and str(method.draft_path) == tiny_gguf
            seen[name] = json.dumps(method.settings, sort_keys=True)
            assert method.variant.startswith(f"llama.cpp {spec_type}")
            method.close()
    assert len(set(seen.values())) == 8  # records of different settings differ


def test_every_name_refuses_an_engine_that_is_not_llama_cpp(scripted, fake_tool):
    with EnginePool() as pool:
        for name in LLAMA_CPP_TOOL_METHODS:
            with pytest.raises(UserError, match="--engine llama.cpp"):
                build_method(name, scripted, MethodOptions(), pool)


@pytest.mark.realmodel
def test_ngram_simple_greedy_output_is_our_autoregressive_output_on_humaneval():
    try:
        llama_cpp_tools.tool_path()
    except SetupError:
        pytest.skip("llama-speculative-simple is not built (make llama-tools); CI does not build it")
    problem = load_problems("humaneval", 1)[0]
    with load_engine("qwen2.5-coder-1.5b-instruct") as target, EnginePool() as pool:
        prompt = build_prompt(target, problem)
        ours = generate(target, prompt, SamplingParams(), 128, stop=problem.stop)
        peer = build_method("llama.cpp-ngram-simple", target, MethodOptions(), pool)
        out, report = peer.run(Request(prompt, SamplingParams(), 128, stop=problem.stop))
    assert report.n_prompt == len(prompt)
    assert (out.text, out.finish_reason) == (ours.text, ours.finish_reason)
    assert out.tokens_per_s == pytest.approx(report.decode_tokens_per_s)


def test_the_built_tool_continues_our_prompt_on_a_tiny_model_as_greedy_autoregressive_does(target):
    """The real binary where `make llama-tools` built it (skipped otherwise): same prompt tokens, same greedy bytes.

    The tiny model writes bytes that are not UTF-8, so the tool's whole text is compared with ours decoded
    the same way (the peer's stop-string cut is checked on real text by the realmodel test)."""
    try:
        llama_cpp_tools.tool_path()
    except SetupError:
        pytest.skip("llama-speculative-simple is not built (make llama-tools)")
    prompt = target.tokenize(PROMPT)
    ours = generate(target, prompt, SamplingParams(), 32)
    method = LlamaCppToolMethod(target, "ngram-simple", tuned=True)
    out, report = method.run(Request(prompt, SamplingParams(), 32))
    assert report.n_prompt == len(prompt)
    assert report.text == target.detokenize([t for t in ours.tokens if t not in target.eog_token_ids])
    assert out.tokens_per_s == pytest.approx(report.decode_tokens_per_s) and out.prefill_s == report.prompt_s
