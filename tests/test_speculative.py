"""The speculative decode loop: exact stopping rules on a scripted engine, losslessness on tiny models."""

import time
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import stats

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength, DraftPricing
from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.decoding.drafter import Draft, StepTiming
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.decoding.stats import DrafterStats
from codeaccel.engines import load_engine
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.engines.pool import EnginePool
from codeaccel.engines.tokenizer import check_same_tokenizer
from codeaccel.errors import CodeaccelError
from codeaccel.methods.registry import MethodOptions, build_method
from conftest import ScriptedEngine

GREEDY = SamplingParams()


def flat_curve(k_max=32) -> CostCurve:
    """A cost curve where verifying any k costs one step (an idealised accelerator)."""
    return CostCurve("m", "e", None, 0, 1, list(range(1, k_max + 1)), [0.01] * k_max, [1.0] * k_max)


class ScriptDrafter:
    """Proposes by following its own successor map (right or wrong), without probabilities."""

    name = "script"

    def __init__(self, successor: dict[int, int]):
        self.successor = successor
        self.calls: list[tuple[int, int]] = []  # (context length, k)
        self.observed: list[tuple[int, int, list[int]]] = []  # (draft length, accepted, committed)

    def start(self, prompt: Sequence[int], exclude_files=frozenset(), prediction=()) -> "ScriptDrafter":
        return self  # a test drafter: one request at a time

    def propose(self, context, k, params, rng) -> Draft:
        self.calls.append((len(context), k))
        out, t = [], context[-1]
        for _ in range(k):
            t = self.successor.get(t, 0)
            out.append(t)
        return Draft(tokens=out)

    def observe(self, context, draft, verdict, timing) -> None:
        self.observed.append((len(draft.tokens), verdict.n_accepted, list(verdict.tokens)))

    def stats(self) -> DrafterStats:
        return DrafterStats(draft_sources={"script": len(self.calls)})

    def close(self) -> None:
        pass


# ScriptedEngine: "a"(1) -> "b"(2) -> "c"(3) -> "\n"(4) -> "END"(5) -> "a" ... ; "x"(6) -> EOS(0)
PERFECT = {1: 2, 2: 3, 3: 4, 4: 5, 5: 1, 6: 0}
WRONG_AFTER_C = {1: 2, 2: 3, 3: 1, 4: 5, 5: 1, 6: 0}  # drafts "a" where the target says "\n"


def run_both(scripted, drafter, prompt_text, max_tokens, stop=(), k=4):
    prompt = scripted.tokenize(prompt_text)
    ar = generate(scripted, prompt, GREEDY, max_tokens, stop)
    policy = DraftLength(flat_curve(), fixed_k=k)
    spec = speculative_generate(scripted, drafter, policy, prompt, GREEDY, max_tokens, stop)
    return ar, spec


@pytest.mark.parametrize("successor", [PERFECT, WRONG_AFTER_C], ids=["perfect-draft", "wrong-draft"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_stop_string_inside_an_accepted_run_ends_where_autoregressive_ends(scripted, successor, k):
    ar, spec = run_both(scripted, ScriptDrafter(successor), "a", 40, stop=["END"], k=k)
    assert spec.tokens == ar.tokens and spec.text == ar.text == "bc\n"
    assert spec.finish_reason == ar.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_inside_an_accepted_run(scripted, max_tokens):
    ar, spec = run_both(scripted, ScriptDrafter(PERFECT), "a", max_tokens, k=8)
    assert spec.tokens == ar.tokens and len(spec.tokens) == max_tokens
    assert spec.finish_reason == "length"
    assert spec.stats.steps <= 2  # k=8 drafts cover it in one or two verifications


def test_eos_inside_an_accepted_run(scripted):
    ar, spec = run_both(scripted, ScriptDrafter(PERFECT), "abx", 20, k=4)
    assert spec.tokens == ar.tokens == [0] and spec.finish_reason == "eos" and spec.text == ""


def test_rejections_rewind_the_target_and_counters_add_up(scripted):
    drafter = ScriptDrafter(WRONG_AFTER_C)
    prompt = scripted.tokenize("a")
    ar = generate(scripted, prompt, GREEDY, 30)
    spec = speculative_generate(scripted, drafter, DraftLength(flat_curve(), fixed_k=4), prompt, GREEDY, 30)
    assert spec.tokens == ar.tokens
    n = len(prompt) + len(spec.tokens) - 1  # all committed tokens but the last are in the cache, in order
    assert scripted.tokens[:n] == prompt + spec.tokens[:-1]
    st = spec.stats.speculation
    assert st.accepted_tokens < st.drafted_tokens  # the wrong draft was rejected somewhere
    assert st.accepted_tokens + spec.stats.steps == len(spec.tokens)  # each step commits accepted + 1
    assert sum(st.proposed_at[:1]) == st.drafts
    assert spec.stats.drafter.draft_sources == {"script": len(drafter.calls)}  # the drafter's counters reach the log
    assert [t for _, _, committed in drafter.observed for t in committed] == spec.tokens[
        : sum(len(c) for _, _, c in drafter.observed)
    ]  # observe() saw every committed token, in order
    assert all(a <= p for a, p in zip(st.accepted_at, st.proposed_at))


def test_draft_length_zero_is_plain_decoding(scripted):
    never = DraftLength(flat_curve(), fixed_k=None)
    costs = LearnedCosts(never.curve, t_draft_s=10.0)  # a draft token costs 1000 target steps: drafting can never pay
    drafter = ScriptDrafter(PERFECT)
    prompt = scripted.tokenize("a")
    spec = speculative_generate(scripted, drafter, never, prompt, GREEDY, 12, costs=costs)
    assert drafter.calls == [] and spec.stats.speculation.drafts == 0
    assert spec.stats.to_record()["chosen_k"] == {"0": 12}
    assert spec.tokens == generate(scripted, prompt, GREEDY, 12).tokens


def test_draft_model_drafter_keeps_its_cache_in_step():
    successor = {1: 2, 2: 3, 3: 4, 4: 5, 5: 1}
    draft = ScriptedEngine(["<eos>", "a", "b", "c", "\n", "END"], successor)
    drafter = DraftModelDrafter(draft)
    prompt = [1, 2]
    session = drafter.start(prompt)
    proposal = session.propose(prompt, 3, GREEDY, np.random.default_rng(0))
    assert proposal.tokens == [3, 4, 5] and proposal.probs is None
    draft.forward_calls.clear()
    # the target accepted 3 and 4, then recovered 1: only the new tokens are evaluated
    session.propose(prompt + [3, 4, 1], 2, GREEDY, np.random.default_rng(0))
    assert draft.forward_calls == [[1], [2]]  # the recovered token, then one draft step


def test_draft_model_drafter_returns_probabilities_when_sampling():
    draft = ScriptedEngine(["<eos>", "a", "b", "c"], {1: 2, 2: 3, 3: 1})
    session = DraftModelDrafter(draft).start([1])
    proposal = session.propose([1], 3, SamplingParams(temperature=1.0), np.random.default_rng(0))
    assert proposal.probs.shape == (3, 4)
    np.testing.assert_allclose(proposal.probs.sum(-1), 1.0)
    assert all(proposal.probs[i, t] > 0 for i, t in enumerate(proposal.tokens))


class UnsureEngine(ScriptedEngine):
    """A ScriptedEngine whose logit for the successor of token t is ``strength[t]`` (default 10: sure)."""

    def __init__(self, pieces, successor, strength: dict[int, float]):
        super().__init__(pieces, successor)
        self.strength = strength

    def _forward(self, tokens, all_logits):
        logits = super()._forward(tokens, all_logits=True)
        for row, t in enumerate(tokens):
            logits[row, self.successor.get(t, 0)] = self.strength.get(t, 10.0)
        return logits if all_logits else logits[-1:]


PIECES = ["<eos>", "a", "b", "c", "\n", "END"]
CHAIN = {1: 2, 2: 3, 3: 4, 4: 5, 5: 1}


def test_draft_model_drafter_stops_where_its_confidence_no_longer_pays():
    # LINEAR-like curve: each verified token costs 0.3 steps; a draft step 0.1 target steps
    curve = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, [1 + 0.3 * i for i in range(32)])
    policy = DraftLength(curve, stop_by_confidence=True)
    pricing = DraftPricing(policy, LearnedCosts(curve, t_target_s=0.01, t_draft_s=0.001))
    draft = UnsureEngine(PIECES, CHAIN, strength={3: 0.0})  # after "c" the draft is unsure: p = 1/6
    session = DraftModelDrafter(draft, pricing=pricing).start([1])
    draft.forward_calls.clear()
    proposal = session.propose([1], 5, GREEDY, np.random.default_rng(0))
    assert proposal.tokens == [2, 3]  # "\n" after "c" (survival 1/6 < 0.3) is not drafted
    assert draft.forward_calls == [[1], [2], [3]]  # the context's last token, then two draft steps
    assert session.stats() == DrafterStats(confidence_stops=1)
    # a draft step dearer than the survival so far is not taken at all: p("b" | "a") = 0.47
    pricing = DraftPricing(policy, LearnedCosts(curve, t_target_s=0.01, t_draft_s=0.004))  # 0.4 + 0.3 > 0.47
    draft = UnsureEngine(PIECES, CHAIN, strength={1: 1.5})
    session = DraftModelDrafter(draft, pricing=pricing).start([1])
    draft.forward_calls.clear()
    assert session.propose([1], 5, GREEDY, np.random.default_rng(0)).tokens == [2]
    assert draft.forward_calls == [[1]]  # no draft step
    unpriced = DraftModelDrafter(draft).start([1])
    assert unpriced.propose([1], 5, GREEDY, np.random.default_rng(0)).tokens == [2, 3, 4, 5, 1]


def test_draft_model_drafter_skips_the_prompt_when_drafting_cannot_pay():
    """Where even fully accepted drafts lose (llama.cpp on this CPU), the draft does not prefill the prompt."""
    steep = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, [1 + 1.5 * i for i in range(32)])
    costs = LearnedCosts(steep, t_target_s=0.01, t_draft_s=0.006)
    pricing = DraftPricing(DraftLength(steep, stop_by_confidence=True), costs)
    assert not pricing.can_pay(costs.snapshot())
    draft = UnsureEngine(PIECES, CHAIN, strength={})
    drafter = DraftModelDrafter(draft, pricing=pricing)
    session = drafter.start([1, 2, 3])
    assert draft.forward_calls == []
    # if the policy drafts after all (batches got cheap, the draft fast), propose catches up on the context, once
    for _ in range(60):
        costs.record_verification(15, 0.005, 16)  # 16 tokens now cost half a step: s clips to its floor, 0.1
        costs.record_draft(1, 0.0001)
    assert pricing.can_pay(costs.snapshot())
    real_prefill = draft.prefill

    def slow_prefill(tokens):  # the catch-up on a skipped prompt takes long; drafting itself does not
        time.sleep(0.05)
        return real_prefill(tokens)

    draft.prefill = slow_prefill
    t0 = time.perf_counter()
    proposal = session.propose([1, 2, 3, 4], 2, GREEDY, np.random.default_rng(0))
    draft_s = time.perf_counter() - t0
    del draft.prefill
    assert proposal.tokens == [5, 1] and proposal.catch_up_s >= 0.05
    assert draft.forward_calls == [[1, 2, 3, 4], [5]]
    before = costs.snapshot().t_draft_s
    session.observe([1, 2, 3, 4], proposal, None, StepTiming(0.01, draft_s, 3))
    assert costs.snapshot().t_draft_s < before + 0.001  # the catch-up is not priced as drafting (0.025 s a token)
    drafter.start([1, 2, 3])  # once drafting can pay, start prefills again (reusing the cached [1, 2])
    assert draft.forward_calls == [[1, 2, 3, 4], [5], [3]]


# ---- invalid settings -----------------------------------------------------------------------
def test_invalid_settings_are_refused(tiny_gguf):
    with pytest.raises(CodeaccelError, match="k must be >= 1"):
        MethodOptions(draft_k=0)
    with pytest.raises(CodeaccelError, match="k must be >= 1"):
        DraftLength(flat_curve(), fixed_k=-2)
    with pytest.raises(CodeaccelError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with load_engine(tiny_gguf, n_ctx=256) as target:
        other = ScriptedEngine(["<eos>", "a"], {})
        with pytest.raises(CodeaccelError, match="vocabulary"):
            check_same_tokenizer(other, target)


def test_method_refuses_a_draft_model_with_another_vocabulary(tiny_gguf, tmp_path, monkeypatch):
    import tiny_models

    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path / "cache"))
    small_vocab = tiny_models.build_gguf_model(tmp_path / "other.gguf", seed=2, vocab_size=300)
    with load_engine(tiny_gguf, n_ctx=512) as target, EnginePool() as pool:
        with pytest.raises(CodeaccelError, match="same tokenizer"):
            build_method("speculative", target, MethodOptions(draft_model=str(small_vocab)), pool)


# ---- lossless on real (tiny) models ----------------------------------------------------------
PROMPTS = ["def add(a, b):\n    return", "import os\n\nclass Path:", "for i in range(10):\n    print("]


@pytest.fixture(scope="module", params=["llama.cpp", "hf"])
def pair(request, tiny_gguf, tiny_gguf_draft, tiny_hf, tiny_hf_draft):
    """(target, draft-of-other-weights, draft-of-same-weights) on one engine."""
    paths = (tiny_gguf, tiny_gguf_draft) if request.param == "llama.cpp" else (tiny_hf, tiny_hf_draft)
    engines = [load_engine(p, request.param, n_ctx=512, dtype="float32") for p in (paths[0], paths[1], paths[0])]
    yield engines
    for e in engines:
        e.close()


@pytest.mark.parametrize("which", ["other-weights", "same-weights"])
def test_greedy_speculative_equals_autoregressive_on_tiny_models(pair, which):
    target, other, same = pair
    drafter = DraftModelDrafter(other if which == "other-weights" else same)
    for prompt_text in PROMPTS:
        prompt = target.tokenize(prompt_text)
        ar = generate(target, prompt, GREEDY, 40)
        for k in (1, 4):
            spec = speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=k), prompt, GREEDY, 40)
            assert spec.tokens == ar.tokens, (prompt_text, k)
            if which == "same-weights":  # the draft is the target: everything is accepted
                assert spec.stats.speculation.accepted_tokens == spec.stats.speculation.drafted_tokens


def test_cost_curve_is_measured_once_then_reused(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    from codeaccel.engines.cost_curve import cost_curve_for

    target = pair[0]
    curve = cost_curve_for(target)
    assert len(curve.relative) == 32 and curve.relative[0] == 1.0  # k = 1..32: a 16-token draft needs C(17)
    assert len(list((tmp_path / "cost_curves").glob("*.json"))) == 1
    assert cost_curve_for(target) == curve  # loaded, not re-measured (timings would differ)


def test_adaptive_k_learns_acceptance_and_stays_lossless(pair):
    target, other, same = pair
    prompt = target.tokenize(PROMPTS[0])
    ar = generate(target, prompt, GREEDY, 60)
    policy = DraftLength(flat_curve(), objective="target")
    good = speculative_generate(target, DraftModelDrafter(same), policy, prompt, GREEDY, 60)
    bad = speculative_generate(target, DraftModelDrafter(other), policy, prompt, GREEDY, 60)
    assert good.tokens == ar.tokens and bad.tokens == ar.tokens
    # each request learned from what was accepted (prior 0.8)
    assert good.stats.cost_model.alpha > 0.9 and bad.stats.cost_model.alpha < 0.5


@pytest.mark.parametrize("method", ["speculative", "speculative-client-draft"])
def test_speculative_methods_stop_drafts_by_confidence_and_stay_lossless(
    tiny_gguf, tiny_gguf_draft, tmp_path, monkeypatch, method
):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    with load_engine(tiny_gguf, n_ctx=512) as target, EnginePool() as pool:
        spec = build_method(method, target, MethodOptions(draft_model=str(tiny_gguf_draft)), pool)
        fixed = build_method(method, target, MethodOptions(draft_model=str(tiny_gguf_draft), draft_k=3), pool)
        assert "draft_stop=confidence" in spec.variant and "draft_stop" not in fixed.variant
        for prompt_text in PROMPTS:
            prompt = target.tokenize(prompt_text)
            ar = generate(target, prompt, GREEDY, 40)
            out = spec.generate(Request(prompt, GREEDY, 40))
            assert out.tokens == ar.tokens
            assert out.stats.drafter.confidence_stops is not None
            assert fixed.generate(Request(prompt, GREEDY, 40)).stats.drafter.confidence_stops is None


def _exact_sequence_probs(target, prompt, params, length):
    """Every continuation of up to ``length`` tokens (ending early at EOG) with its target probability."""
    out = {}

    def walk(prefix, prob):
        if len(prefix) == length or (prefix and prefix[-1] in target.eog_token_ids):
            out[tuple(prefix)] = prob
            return
        p = logits_to_probs(target.prefill(prompt + prefix), params)
        for t in np.flatnonzero(p):
            walk(prefix + [int(t)], prob * p[t])

    walk([], 1.0)
    return out


class _Tempered:
    """The target's own weights with its logits scaled: the same top tokens, other probabilities (a draft whose q
    overlaps p partly, so rejection sampling's residual max(0, p - q) is what decides)."""

    def __init__(self, engine, factor: float):
        self._engine, self.factor = engine, factor

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, tokens):
        return self._engine.prefill(tokens) * self.factor

    def eval(self, tokens, *args, **kwargs):
        return self._engine.eval(tokens, *args, **kwargs) * self.factor


@pytest.mark.parametrize("which", ["other-weights", "same-weights", "tempered", "confidence-stop"])
def test_speculative_sampling_matches_target_distribution(tiny_gguf, tiny_gguf_draft, which):
    """Chi-square over all 3-token continuations (top-k 3): speculative samples follow the target exactly.

    tempered: the target's weights at a flatter temperature, the same support with other probabilities:
    tokens are accepted often, but not always (the residual distribution is sampled).
    confidence-stop: drafts end early where the draft is unsure (each extra verified token
    priced at half a step), so draft lengths vary from step to step and sample to sample.
    """
    params = SamplingParams(temperature=1.5, top_k=3)
    with (
        load_engine(tiny_gguf, n_ctx=256) as target,
        load_engine(tiny_gguf if which in ("same-weights", "tempered") else tiny_gguf_draft, n_ctx=256) as draft,
    ):
        draft = _Tempered(draft, 0.5) if which == "tempered" else draft
        prompt = target.tokenize("def f(x):\n    return")
        exact = _exact_sequence_probs(target, prompt, params, 3)
        if which == "confidence-stop":
            half_step = CostCurve("m", "e", None, 0, 1, [1, 2, 3, 4], [0.01] * 4, [1.0, 1.5, 2.0, 2.5])
            policy = DraftLength(half_step, k_max=3, stop_by_confidence=True)
            costs = LearnedCosts(half_step)  # shared by the loop and the drafter's pricing, as a method does
            drafter = DraftModelDrafter(draft, pricing=DraftPricing(policy, costs))
        else:
            policy = DraftLength(flat_curve(), fixed_k=2)
            costs = LearnedCosts(policy.curve)
            drafter = DraftModelDrafter(draft)
        stops = drafted = accepted = 0
        n = 3000
        counts = dict.fromkeys(exact, 0)
        for seed in range(n):
            params = SamplingParams(1.5, top_k=3, seed=seed)
            gen = speculative_generate(target, drafter, policy, prompt, params, 3, costs=costs)
            counts[tuple(gen.tokens)] += 1  # a KeyError here is a sequence the target cannot produce
            stops += gen.stats.drafter.confidence_stops or 0
            drafted += gen.stats.speculation.drafted_tokens
            accepted += gen.stats.speculation.accepted_tokens
        if which == "tempered":
            assert 0.3 < accepted / drafted < 0.95  # partly accepted: the residual decided the rest
        if which == "confidence-stop":
            assert stops > 0 and drafted > 0  # both outcomes happened
        seqs = list(exact)
        observed = np.array([counts[s] for s in seqs])
        expected = np.array([exact[s] for s in seqs]) * n
        assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_speculative_sampling_is_deterministic_under_a_seed(pair):
    target, other, _ = pair
    drafter = DraftModelDrafter(other)
    prompt = target.tokenize(PROMPTS[1])
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=123)
    runs = [
        speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=3), prompt, params, 30).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other_seed = speculative_generate(
        target, drafter, DraftLength(flat_curve(), fixed_k=3), prompt, SamplingParams(0.8, 0.9, seed=124), 30
    )
    assert other_seed.tokens != runs[0]
