"""Two requests at once: per-request state stays per request, shared objects are safe to share.

Two generations run concurrently, each on its own target engine, sharing everything a
method shares between its requests (the drafter with its datastores, lookup pool and
acceptance cache; the learned costs); their outputs must equal those of the same
requests run one after the other. An engine used by two threads at once refuses.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength, DraftPricing
from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.engines import load_engine
from codeaccel.engines.tokenizer import tokenizer_fingerprint
from codeaccel.errors import InternalError
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.datastore import build_datastore
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.timing import RetrievalTiming
from conftest import ScriptedEngine
from test_draft_length import LINEAR

PROMPTS = ["class Square:\n    def area(self):\n        return self.", "def perimeter(side):\n    return"]
CODE = (
    "class Square:\n    def __init__(self, side):\n        self.side = side\n\n"
    "    def area(self):\n        return self.side * self.side\n"
)


def _run_pair(targets, generate_one):
    """Each prompt on its own target: one after the other, then both at once."""
    sequential = [generate_one(t, p) for t, p in zip(targets, PROMPTS)]
    start = threading.Barrier(2)

    def at_once(target, prompt):
        start.wait()  # both requests enter the decode loop together
        return generate_one(target, prompt)

    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(at_once, targets, PROMPTS))
    return sequential, concurrent


def test_two_retrieval_requests_at_once_share_the_drafter_cache_and_costs(tiny_gguf, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "square.py").write_text(CODE * 3)
    with load_engine(tiny_gguf, n_ctx=512) as a, load_engine(tiny_gguf, n_ctx=512) as b:
        fp = tokenizer_fingerprint(a.n_vocab, a.tokenize)
        store = build_datastore(tmp_path / "ds", "repo", "repository", [root], a.tokenize, fp)
        cache = AcceptanceCache()  # shared by both requests, on purpose
        drafter = RetrievalDrafter([store, store], timing=RetrievalTiming(LINEAR), cache=cache, min_match=1)
        policy = DraftLength(LINEAR, fixed_k=8)
        costs = LearnedCosts(LINEAR)

        def one(target, text):
            return speculative_generate(
                target, drafter, policy, target.tokenize(text), SamplingParams(), 40, costs=costs
            )

        try:
            sequential, concurrent = _run_pair([a, b], one)
        finally:
            drafter.close()
    assert [g.tokens for g in concurrent] == [g.tokens for g in sequential]
    assert all(g.stats.drafter.retrieval.lookups > 0 for g in concurrent)
    assert len(cache) > 0


def test_two_draft_model_requests_at_once_share_the_learned_costs(tiny_gguf, tiny_gguf_draft):
    engines = [load_engine(p, n_ctx=512) for p in (tiny_gguf, tiny_gguf, tiny_gguf_draft, tiny_gguf_draft)]
    targets, drafts = engines[:2], engines[2:]
    try:
        policy = DraftLength(LINEAR, objective="target", stop_by_confidence=True)
        costs = LearnedCosts(LINEAR)  # both requests record into it, and price their drafts from it
        drafters = {id(t): DraftModelDrafter(d, DraftPricing(policy, costs)) for t, d in zip(targets, drafts)}
        params = SamplingParams()  # greedy: the output is the target's, whatever k the shared costs chose

        def one(target, text):
            prompt = target.tokenize(text)
            return speculative_generate(target, drafters[id(target)], policy, prompt, params, 40, costs=costs)

        sequential, concurrent = _run_pair(targets, one)
    finally:
        for e in engines:
            e.close()
    assert [g.tokens for g in concurrent] == [g.tokens for g in sequential]


class BlockingEngine(ScriptedEngine):
    """A scripted engine whose evaluation waits until released: a request caught inside it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inside, self.release = threading.Event(), threading.Event()

    def _forward(self, tokens, all_logits):
        self.inside.set()
        self.release.wait(10)
        return super()._forward(tokens, all_logits)


def test_an_engine_refuses_a_second_thread_while_one_is_inside():
    engine = BlockingEngine(["<eos>", "a", "b"], {1: 2, 2: 1})
    first = threading.Thread(target=engine.eval, args=([1],))
    first.start()
    assert engine.inside.wait(10)
    with pytest.raises(InternalError, match="in use by another thread"):
        engine.eval([2])
    engine.release.set()
    first.join()
    assert engine.tokens == [1]  # the refused call changed nothing
    engine.eval([2])  # free again
    assert engine.tokens == [1, 2]
