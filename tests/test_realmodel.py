"""The realmodel tier: the bundled Qwen2.5-Coder models, end to end (CI runs it)."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.harness import BenchConfig, build_prompt, run_bench
from codeaccel.bench.load_test import fim_requests
from codeaccel.bench.logit_noise import find_noise
from codeaccel.bench.report import summarize
from codeaccel.bench.store import ResultStore
from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.engines.cost_curve import CostCurve, save_cost_curve
from codeaccel.methods.registry import MethodOptions
from codeaccel.models.registry import BUNDLED, cache_dir, is_assembled, resolve_model
from codeaccel.serve.prompts import fim_prompt
from codeaccel.serve.settings import ServeSettings
from live_server import LiveServer
from test_engines import _library_greedy

pytestmark = pytest.mark.realmodel
SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def test_bundled_models_assemble_and_verify():
    for name, model in BUNDLED.items():
        src = resolve_model(name)
        assert src.path.stat().st_size == model.size_bytes
        assert is_assembled(model)


@pytest.mark.parametrize(
    "model,engine,n_prompts,n_tokens", [(SMALL, "llama.cpp", 3, 48), (LARGE, "llama.cpp", 1, 32), (SMALL, "hf", 1, 24)]
)
def test_greedy_matches_library_on_humaneval_prompts(model, engine, n_prompts, n_tokens):
    with load_engine(model, engine, dtype="float32") as eng:
        assert eng.n_vocab == 151936 and 151645 in eng.eog_token_ids  # <|im_end|>
        for problem in load_problems("humaneval", n_prompts):
            prompt = build_prompt(eng, problem)
            ours = generate(eng, prompt, SamplingParams(), max_tokens=n_tokens).tokens
            assert ours == _library_greedy(eng, prompt, n_tokens)[: len(ours)]
            assert len(ours) >= 5


def test_bench_end_to_end_on_the_small_model(tmp_path):
    config = BenchConfig(model=SMALL, datasets=("humaneval", "mbpp"), limit=3, max_tokens=256)
    records = run_bench(config, ResultStore(tmp_path / "r.jsonl"))
    rows = {r["dataset"]: r for r in summarize(records)}
    assert rows["humaneval"]["n_problems"] == 3 and rows["mbpp"]["n_problems"] == 3
    # the first problems are easy: a broken prompt, stop rule or test program would fail them all
    assert rows["humaneval"]["n_passed"] + rows["mbpp"]["n_passed"] >= 4
    assert all(r["finish_reason"] == "stop" for r in records)


def test_speculative_0_5b_to_1_5b_is_lossless_on_humaneval_prompts(tmp_path, monkeypatch):
    """Greedy: identical to autoregressive, or a divergence at a near tie of the target's logits.

    Draft lengths follow the cost curves: both models' measured curves are pinned (a quick first-use
    profile on a noisy CI machine once made every draft a single token, mean accepted length 1.2)."""
    resolve_model(SMALL), resolve_model(LARGE)  # assembled in the real cache before it is linked
    _pin_cost_curve(
        tmp_path / "cache", *(DOCS / "cost_curves" / "xeon" / f"cost_curve-llama.cpp-{m}.json" for m in (SMALL, LARGE))
    )
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    config = BenchConfig(
        model=LARGE,
        methods=("autoregressive", "speculative-client-draft"),
        limit=4,
        max_tokens=128,
        options=MethodOptions(draft_model=SMALL),
    )
    records = run_bench(config, ResultStore(tmp_path / "r.jsonl"))
    noise = find_noise(tmp_path, "llama.cpp", LARGE)
    (row,) = [r for r in summarize(records, noise) if r["method"] == "speculative-client-draft"]
    assert row["identical_to_autoregressive"] + row["divergences_at_near_ties"] == 4
    assert row["divergences_at_clear_margin"] == 0
    assert row["mean_accepted_len"] > 2  # the 0.5B drafts code the 1.5B accepts
    # the target evaluates fewer times than it emits tokens (counted, not timed: speed lives in the benchmarks)
    assert row["tokens_per_target_eval"] > 1.2


def test_retrieval_on_a_real_repository_is_lossless_and_accepts_drafts(tmp_path):
    """repo:rich on the 0.5B model, rich itself as the repository source (each problem's own file excluded)."""
    from codeaccel.bench.repo_dataset import package_root
    from codeaccel.engines.tokenizer import tokenizer_fingerprint
    from codeaccel.retrieval.datastore import build_datastore

    with load_engine(SMALL, n_ctx=512) as eng:
        fp = tokenizer_fingerprint(eng.n_vocab, eng.tokenize)
        build_datastore(tmp_path / "rich", "rich", "repository", [package_root("rich")], eng.tokenize, fp)
    config = BenchConfig(
        model=SMALL,
        methods=("autoregressive", "retrieval"),
        datasets=("repo:rich",),
        limit=3,
        max_tokens=96,
        # timing control off: every retrieved draft is verified (on this CPU's 0.5B cost curve the
        # policy verifies only long matches, which three short problems may not have)
        options=MethodOptions(datastores=(str(tmp_path / "rich"),), ablate=("timing",)),
    )
    records = run_bench(config, ResultStore(tmp_path / "r.jsonl"))
    noise = find_noise(tmp_path, "llama.cpp", SMALL)
    (row,) = [r for r in summarize(records, noise) if r["method"] == "retrieval"]
    assert row["identical_to_autoregressive"] + row["divergences_at_near_ties"] == 3
    assert row["divergences_at_clear_margin"] == 0
    assert row["mean_accepted_len"] > 1.5  # the project's own idioms get accepted
    assert row["edit_similarity"] > 0.3


def _pin_cost_curve(cache: Path, *committed: Path) -> None:
    """A user cache at ``cache`` with the bundled models and the ``committed`` cost curves as this machine's.

    The retrieval timing verifies a draft only where the cost curve says it pays; a quick first-use
    profile on a noisy CI machine once measured verification nearly as dear as decoding one token at a
    time (C(k) ≈ k), and the timing then rightly verified nothing. Tests of the drafts pin a measured curve.
    """
    real = cache_dir()
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(real / "models")
    fields = CostCurve.__dataclass_fields__
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEACCEL_CACHE_DIR", str(cache))
        for path in committed:
            doc = json.loads(path.read_text())
            save_cost_curve(CostCurve(**{k: v for k, v in doc.items() if k in fields}))  # with this machine's name


def test_context_drafts_and_a_prediction_are_lossless_on_an_edit(tmp_path, monkeypatch):
    """edits:click on the 0.5B model: drafts from the prompt (the file before) and from the old
    function as the predicted output; greedy output as autoregressive, in fewer target evaluations."""
    resolve_model(SMALL)  # assembled in the real cache before it is linked
    committed = DOCS / "cost_curves" / "xeon" / f"cost_curve-llama.cpp-{SMALL}.json"  # C(16) = 3.6 steps
    _pin_cost_curve(tmp_path / "cache", committed)
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    config = BenchConfig(model=SMALL, datasets=("edits:click",), methods=("autoregressive", "context"), limit=1)
    records = run_bench(config, ResultStore(tmp_path / "r.jsonl"))
    noise = find_noise(tmp_path, "llama.cpp", SMALL)
    (row,) = [r for r in summarize(records, noise) if r["method"] == "context"]
    assert row["identical_to_autoregressive"] + row["divergences_at_near_ties"] == 1
    assert row["divergences_at_clear_margin"] == 0
    (record,) = [r for r in records if r["method"] == "context"]
    counts = record["stats"]["retrieval"]
    # fewer target evaluations than tokens: drafts are sized by what verification costs on the machine running
    # the test (learned from its steps since 2026-12-07; the pinned curve is only the shape), so the ratio is
    # the machine's: 1.47 on the AMD EPYC VM under a background job, above 2 on the Xeon VM's curve as pinned
    assert counts.get("prediction_matches", 0) > 0 and row["tokens_per_target_eval"] > 1.25


def test_long_whitespace_tokens_detokenize_whole():
    """Qwen has single tokens of a newline and 31+ spaces (deep indentation); their text must come back whole
    (llama-cpp-python 0.3.36's own detokenize cut every piece longer than 32 bytes)."""
    with load_engine(SMALL, n_ctx=512) as eng:
        text = "def f(a,\n" + " " * 40 + "b):\n    return (a,\n" + " " * 33 + "b)\n"
        tokens = eng.tokenize(text)
        assert any(len(eng.detokenize([t]).encode()) > 32 for t in tokens)  # the case that broke
        assert eng.detokenize(tokens) == text and eng.tokenize(eng.detokenize(tokens)) == tokens


@pytest.mark.parametrize("special", [True, False])
def test_a_long_text_of_qwens_markup_tokenizes_in_pieces_as_a_whole(special):
    """Qwen's control tokens, and its user-defined ones (``<tool_call>``, parsed even with special off)."""
    import random

    from codeaccel.engines.markup_split import PIECE_CHARS, split_at_markup

    with load_engine(SMALL, n_ctx=512) as eng:
        rng = random.Random(1)
        units = ["<|fim_prefix|>", "<|im_end|>", "<tool_call>", "</tool_call>", "def f(x):\n", " " * 9, "é", "<|"]
        text = "".join(rng.choice(units) for _ in range(3 * PIECE_CHARS // 5))
        assert len(split_at_markup(text, eng._markup(special))) > 1
        assert eng.tokenize(text, special=special) == eng.llm.tokenize(text.encode(), add_bos=False, special=special)


def test_reduced_draft_vocabulary_gives_the_full_models_logits_on_a_real_prompt(tmp_path, monkeypatch):
    """The bundled 0.5B's quantized rows (Q8_0 output, Q5_0 embeddings) cut to 32,768 tokens: exact where kept."""
    import numpy as np

    from codeaccel.models.draft_vocab import draft_vocabulary

    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    with load_engine(SMALL) as full:
        prompt = build_prompt(full, load_problems("humaneval", 1)[0])
        answer = generate(full, prompt, SamplingParams(), max_tokens=24).tokens
        counts = np.ones(full.n_vocab, dtype=np.int64)
        counts[answer[1::2]] = 0  # ranked last: dropped (where not also among the other answer tokens)
        counts[answer[::2]] = 2
        vocab = draft_vocabulary(resolve_model(SMALL).path, counts, 32768, sorted(full.eog_token_ids), "test")
        sequence = prompt + answer
        full.reset()  # generate left the prompt and answer in the cache
        expected = full.eval(sequence)[-len(answer) - 1 :]  # [n, vocab]
    dropped = sorted(set(answer[1::2]) - set(vocab.token_ids.tolist()))
    assert dropped  # some inputs are tokens the reduced output layer does not have
    with load_engine(SMALL, vocabulary=vocab) as small:
        got = small.eval(sequence)[-len(answer) - 1 :]
    np.testing.assert_allclose(got[:, vocab.token_ids], expected[:, vocab.token_ids], rtol=1e-5, atol=1e-4)
    assert np.isneginf(got[:, dropped]).all()


def test_the_server_fills_in_the_middle_and_batches_losslessly(tmp_path, monkeypatch):
    """The 0.5B behind ``codeaccel serve`` (context drafts verified in the batch): Qwen's FIM tokens
    fill an obvious gap, and four concurrent /infill requests each get the tokens decoding alone gives."""
    resolve_model(SMALL)
    _pin_cost_curve(tmp_path / "cache", DOCS / "cost_curves" / "xeon" / f"cost_curve-llama.cpp-{SMALL}.json")
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    settings = ServeSettings(model=SMALL, parallel=4, ctx_size=2048, events_db=tmp_path / "events.sqlite")
    requests = fim_requests(4, seed=1)
    with LiveServer(settings) as live:
        fim = live.client().completions.create(
            model=SMALL,
            prompt="def add(a, b):\n    return ",
            suffix="\n\nprint(add(1, 2))\n",
            max_tokens=8,
            temperature=0,
        )
        assert "a + b" in fim.choices[0].text

        def infill(r):
            body = {"input_prefix": r.prefix, "input_suffix": r.suffix, "n_predict": 32, "temperature": 0}
            return httpx.post(live.url + "/infill", json=body, timeout=300).json()["content"]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(infill, requests))
        engine = live.app.state.codeaccel.runtime.engine
        expected = []
        with load_engine(SMALL, n_ctx=2048) as alone:
            for r in requests:
                tokens = fim_prompt(engine, r.prefix, r.suffix, 2048 - 32, repo_head=True)
                expected.append(generate(alone, tokens, SamplingParams(), 32, ()).text)
    assert got == expected


def test_cascade_solve_answers_a_humaneval_problem_live_with_the_bundled_models():
    """0.5B's greedy answer and test (θ = 1: accepted only if it passes every line it wrote), else the 1.5B's
    greedy answer: HumanEval/0 is solved either way, and the 0.5B's answer is the sweep's stored one."""
    from codeaccel.cascade.config import Stage, make_config
    from codeaccel.cascade.problems import load_cascade_problems
    from codeaccel.cascade.solve import CascadeSolver
    from codeaccel.cascade.store import GenerationStore

    cp = load_cascade_problems("humaneval", 1)[0]
    config = make_config([Stage(SMALL, 1, 2), Stage(LARGE, 0, 0)], 1.0)
    with CascadeSolver(config) as solver:
        solution = solver.solve(cp)
    first = solution.stages[0]
    assert first.n_lines >= 1 and first.verdict is not None and first.decided in ("accepted", "escalated")
    assert solution.official_passed is True
    with GenerationStore(DOCS / "cascade" / "humaneval" / "store.sqlite") as store:
        stored = {g.sample: g.text for g in store.generations(SMALL, "humaneval", cp.task_id) if g.kind == "answer"}
    if solution.answered_by == 0:  # greedy, 2 sequences here against 33 in the sweep: equal up to near ties
        assert solution.completion == stored[-1]
