"""The decoding methods the benchmark and the CLI can run, by name.

Each one is built from the loaded target engine, :class:`MethodOptions`, and an
:class:`EnginePool` that loads (and later closes) shared draft engines; a new
method is one entry in :data:`BUILDERS`, and the harness needs no change.
``retrieval-without-<part>`` is retrieval with one part ablated, run and stored
under its own name, so an ablation study runs interleaved with the full method and
the baseline on every problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength, DraftPricing, Objective
from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.engines.base import Engine
from codeaccel.engines.cost_curve import cost_curve_for
from codeaccel.engines.pool import EnginePool
from codeaccel.engines.tokenizer import check_same_tokenizer
from codeaccel.errors import UserError
from codeaccel.methods.method import AutoregressiveMethod, Method, SpeculativeMethod
from codeaccel.models.draft_vocab import MIN_SIZE as MIN_DRAFT_VOCAB
from codeaccel.models.draft_vocab import DraftVocabulary, draft_vocabulary, token_counts
from codeaccel.models.registry import resolve_model
from codeaccel.peers.hf_generate import HFGenerateMethod
from codeaccel.peers.llama_cpp_tools import LLAMA_CPP_TOOL_METHODS, llama_cpp_tool
from codeaccel.peers.llama_prompt_lookup import LlamaPromptLookupMethod
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.datastore import open_datastores
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.hybrid import HybridDrafter
from codeaccel.retrieval.timing import RetrievalTiming

DEFAULT_DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"
# Parts of retrieval drafting that --ablate can switch off (the CodeSwift ablation study).
ABLATIONS = ("multi-source", "timing", "cache", "tree", "context")
TREE_BRANCHES = 3  # branches of a retrieval token tree (the best path + 2 alternatives)
RETRIEVAL_K_MAX = 16  # longest retrieved draft considered per step
WITHOUT = "retrieval-without-"
FRSPEC_DRAFT_VOCAB = 32768  # speculative-frspec's draft vocabulary unless --draft-vocab says (FR-Spec's choice too)


@dataclass(frozen=True)
class MethodOptions:
    """Settings some methods need beyond the target engine.

    draft_model: the drafter's model (default: the bundled 0.5B); draft_engine: the
    engine it runs on (default: the target's); draft_k: a fixed draft length instead
    of choosing k from the cost curve each step (>= 1); draft_vocab: keep only this
    many of the draft's output tokens, the most frequent in the general datastore
    (FR-Spec, :mod:`codeaccel.models.draft_vocab`; lossless, llama.cpp only).
    """

    draft_model: str | None = None
    draft_engine: str | None = None
    draft_k: int | None = None
    draft_vocab: int | None = None
    datastores: tuple[str, ...] = ()  # retrieval: datastore directories (default: the general one in the cache)
    ablate: tuple[str, ...] = ()  # retrieval: parts to switch off, from ABLATIONS

    def __post_init__(self) -> None:
        if self.draft_k is not None and self.draft_k < 1:
            raise UserError(f"the draft length k must be >= 1, got {self.draft_k}")
        if self.draft_vocab is not None and self.draft_vocab < MIN_DRAFT_VOCAB:
            raise UserError(f"a draft vocabulary needs at least {MIN_DRAFT_VOCAB} tokens, got {self.draft_vocab}")
        unknown = set(self.ablate) - set(ABLATIONS)
        if unknown:
            raise UserError(f"unknown ablation {sorted(unknown)[0]!r}: choose from {', '.join(ABLATIONS)}")


@dataclass(frozen=True)
class ModelDrafting:
    """The draft-model drafter of a method, the policy its k comes from, and what they record."""

    drafter: DraftModelDrafter
    draft_length: DraftLength
    costs: LearnedCosts  # shared by the method's requests; the drafter's pricing reads the same
    settings: dict


@dataclass(frozen=True)
class RetrievalDrafting:
    drafter: RetrievalDrafter
    settings: dict


# tokens a reduced draft vocabulary always keeps besides the end-of-generation ones: the
# answer format's fences, which a corpus of source files rarely holds
ANSWER_FORMAT_TEXT = "```python\n```\n```"


def ranked_draft_vocabulary(target: Engine, draft_model: str, size: int, engine: str = "llama.cpp") -> DraftVocabulary:
    """``draft_model`` with ``size`` output tokens, the most frequent in the general datastore.

    The datastore is the one for ``target``'s tokenizer. Also kept: the end-of-generation
    tokens and the answer format's fences. Refused before any work where the draft
    cannot have one (another engine, a model that is not a GGUF file).
    """
    source = resolve_model(draft_model)
    if engine != "llama.cpp" or source.kind != "gguf":
        raise UserError("a reduced draft vocabulary (--draft-vocab) needs a GGUF draft on the llama.cpp engine")
    (general,) = open_datastores(target, ())
    try:
        counts = token_counts((shard.tokens for shard in general.shards.values()), target.n_vocab)
    finally:
        general.close()
    always = sorted(target.eog_token_ids | set(target.tokenize(ANSWER_FORMAT_TEXT)))
    corpus = f"datastore {general.name} ({int(counts.sum())} tokens)"
    return draft_vocabulary(source.path, counts, size, always, corpus)


def _draft_vocabulary(target: Engine, options: MethodOptions, pool: EnginePool) -> DraftVocabulary | None:
    """The reduced draft vocabulary ``options`` ask for (made once per pool), or None."""
    if options.draft_vocab is None:
        return None
    model = options.draft_model or DEFAULT_DRAFT_MODEL
    kind = options.draft_engine or target.kind
    size = options.draft_vocab
    return pool.vocabulary(
        (model, kind, size, target.model_name), lambda: ranked_draft_vocabulary(target, model, size, kind)
    )


def _draft_engine(target: Engine, options: MethodOptions, pool: EnginePool) -> Engine:
    model = options.draft_model or DEFAULT_DRAFT_MODEL
    kind = options.draft_engine or target.kind
    vocabulary = _draft_vocabulary(target, options, pool)
    engine = pool.get(model, kind, n_ctx=target.n_ctx, dtype=target.dtype or "bfloat16", vocabulary=vocabulary)
    check_same_tokenizer(engine, target)
    return engine


def _model_drafting(
    target: Engine, options: MethodOptions, pool: EnginePool, costs: LearnedCosts, objective: Objective = "end-to-end"
) -> ModelDrafting:
    """The draft-model drafter and its draft-length policy.

    Unless ``--draft-k`` fixes k, the policy gives a cap and the drafter stops by its
    confidence, priced by that same policy and the method's learned costs.
    """
    adaptive = options.draft_k is None
    length = DraftLength(costs.curve, objective=objective, fixed_k=options.draft_k, stop_by_confidence=adaptive)
    draft = _draft_engine(target, options, pool)
    settings = {"draft_model": draft.model_name, "draft_engine": draft.kind}
    if draft.dtype:  # hf only: a bf16 and a float32 draft are two settings
        settings["draft_dtype"] = draft.dtype
    vocabulary = _draft_vocabulary(target, options, pool)  # the one the draft was loaded with (cached)
    if vocabulary is not None:  # a reduced draft is a setting of its own, down to which tokens it keeps
        settings.update(draft_vocab=vocabulary.size, draft_vocab_ids=vocabulary.fingerprint)
    if adaptive:
        settings["draft_stop"] = "confidence"
    else:  # a fixed k is a setting of its own (records of k = 4 and k = 8 are not one row)
        settings["draft_k"] = options.draft_k
    pricing = DraftPricing(length, costs) if adaptive else None
    return ModelDrafting(DraftModelDrafter(draft, pricing=pricing), length, costs, settings)


def _speculative(
    name: str, objective: Objective, draft_vocab: int | None = None
) -> Callable[[Engine, MethodOptions, EnginePool], Method]:
    """The draft model, after the request's own text: a context match the timing control
    finds worth verifying replaces the model's step (with ``--draft-k``: the model alone, k fixed).

    ``draft_vocab``: the draft's output tokens when ``--draft-vocab`` does not say (FR-Spec)."""

    def build(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
        if draft_vocab is not None and options.draft_vocab is None:
            options = replace(options, draft_vocab=draft_vocab)
        costs = LearnedCosts(cost_curve_for(target))
        model = _model_drafting(target, options, pool, costs, objective)
        settings = {**model.settings, "draft_k": options.draft_k or "auto"}
        if options.draft_k is not None:
            return SpeculativeMethod(name, target, model.drafter, model.draft_length, settings, costs)
        timing = RetrievalTiming(costs.curve, k_max=RETRIEVAL_K_MAX, costs=costs)
        context = RetrievalDrafter([], timing=timing, context=True)  # the request's own text only
        drafter = HybridDrafter(context, model.drafter, model.draft_length, costs)
        loop_length = DraftLength(costs.curve, fixed_k=RETRIEVAL_K_MAX)
        return SpeculativeMethod(name, target, drafter, loop_length, {**settings, "context": True}, costs)

    return build


def _retrieval_drafting(
    target: Engine, options: MethodOptions, costs: LearnedCosts, rest: bool = False, datastores: bool = True
) -> RetrievalDrafting:
    """The retrieval drafter with every part on except those ablated; ``rest``: the REST-style peer;
    without ``datastores``: the request's own text (and the acceptance cache) only. ``costs``: the
    method's learned costs (the decode loop records every step in them; the timing reads them)."""
    # REST: one general datastore, every retrieved draft verified (as a token tree), no cache
    off = {"multi-source", "timing", "cache"} if rest else set(options.ablate)
    stores = open_datastores(target, options.datastores) if datastores else []
    if "multi-source" in off and stores:  # one source: the general one if there is one (REST's setting), else the first
        stores = [next((s for s in stores if s.kind == "general"), stores[0])]
    timing = None if "timing" in off else RetrievalTiming(costs.curve, k_max=RETRIEVAL_K_MAX, costs=costs)
    cache = None if "cache" in off else AcceptanceCache()  # shared by the method's requests
    context = not rest and "context" not in off  # the request's own text (REST searches datastores only)
    settings: dict = {"datastores": [s.name for s in stores]}
    if stores:  # a rebuilt datastore of the same name is another setting (records of the old one are not reused)
        settings["datastore_content"] = {s.name: s.fingerprint for s in stores}
    if context:
        settings["context"] = True
    if off and not rest:
        settings["ablate"] = sorted(off)
    branches = 1 if "tree" in off else TREE_BRANCHES
    drafter = RetrievalDrafter(stores, timing=timing, cache=cache, tree_branches=branches, context=context)
    return RetrievalDrafting(drafter, settings)


def _retrieval(
    name: str, rest: bool = False, datastores: bool = True
) -> Callable[[Engine, MethodOptions, EnginePool], Method]:
    def build(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
        costs = LearnedCosts(cost_curve_for(target))  # the loop records every step; the timing reads them
        retrieval = _retrieval_drafting(target, options, costs, rest, datastores)
        k = options.draft_k or RETRIEVAL_K_MAX  # the drafter's timing control picks within it
        length = DraftLength(costs.curve, fixed_k=k)
        settings = retrieval.settings if options.draft_k is None else {**retrieval.settings, "draft_k": k}
        return SpeculativeMethod(name, target, retrieval.drafter, length, settings, costs)

    return build


def _hybrid(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    costs = LearnedCosts(cost_curve_for(target))  # the loop records every verification; both drafters read them
    retrieval = _retrieval_drafting(target, options, costs)
    try:
        model = _model_drafting(target, options, pool, costs)
    except BaseException:  # a draft that does not load: the datastores opened for it are closed, not leaked
        retrieval.drafter.close()
        raise
    settings = {**retrieval.settings, **model.settings}
    drafter = HybridDrafter(retrieval.drafter, model.drafter, model.draft_length, costs)
    loop_length = DraftLength(costs.curve, fixed_k=RETRIEVAL_K_MAX)
    return SpeculativeMethod("hybrid", target, drafter, loop_length, settings, costs)


def _prompt_lookup(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    if target.kind == "llama.cpp":
        return LlamaPromptLookupMethod(target)
    return HFGenerateMethod("prompt-lookup", target, {"prompt_lookup_num_tokens": 10})


def _hf_assisted(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    if target.kind != "hf":
        raise UserError("method 'hf-assisted' runs transformers' assisted generation: it needs --engine hf")
    # transformers' assistant is a transformers model whatever engine our own drafters use (--draft-engine)
    assistant = _draft_engine(target, replace(options, draft_engine="hf"), pool)
    return HFGenerateMethod("hf-assisted", target, {}, assistant=assistant)


BUILDERS: dict[str, Callable[[Engine, MethodOptions, EnginePool], Method]] = {
    "autoregressive": lambda target, options, pool: AutoregressiveMethod(target),
    # draft model; k chosen per step to maximise end-to-end tokens/s (falls back to plain decoding)
    "speculative": _speculative("speculative", "end-to-end"),
    # the same with a cheaper draft: its output layer cut to the most frequent tokens (FR-Spec; --draft-vocab)
    "speculative-frspec": _speculative("speculative-frspec", "end-to-end", draft_vocab=FRSPEC_DRAFT_VOCAB),
    # draft model on the client, target on a server: k chosen to minimise target seconds per token
    "speculative-client-draft": _speculative("speculative-client-draft", "target"),
    # drafts from code datastores (general + repository), timing control and acceptance cache; no draft model
    "retrieval": _retrieval("retrieval"),
    # drafts from the request's own text only (prompt, generated tokens, prediction): no datastore, no draft model
    "context": _retrieval("context", datastores=False),
    # the REST-style peer: one general datastore, every retrieved draft verified (as a tree), no cache
    "retrieval-rest": _retrieval("retrieval-rest", rest=True),
    "hybrid": _hybrid,  # retrieval first, the draft model when retrieval has nothing
    "prompt-lookup": _prompt_lookup,  # the engine library's own n-gram prompt lookup
    "hf-assisted": _hf_assisted,  # transformers' assisted generation with the same draft model
    # llama.cpp's own C++ speculative decoder (llama-speculative-simple, `make llama-tools`): each of its
    # speculation types with its own defaults, and -tuned with settings tuned on this CPU
    "llama.cpp-ngram-simple": llama_cpp_tool("ngram-simple"),
    "llama.cpp-ngram-simple-tuned": llama_cpp_tool("ngram-simple", tuned=True),
    "llama.cpp-ngram-mod": llama_cpp_tool("ngram-mod"),
    "llama.cpp-ngram-mod-tuned": llama_cpp_tool("ngram-mod", tuned=True),
    "llama.cpp-ngram-cache": llama_cpp_tool("ngram-cache"),
    "llama.cpp-ngram-cache-tuned": llama_cpp_tool("ngram-cache", tuned=True),
    "llama.cpp-draft-simple": llama_cpp_tool("draft-simple"),  # the bundled 0.5B drafts (or --draft-model)
    "llama.cpp-draft-simple-tuned": llama_cpp_tool("draft-simple", tuned=True),
}

# methods that choose draft lengths from the target's cost curve (every one but these)
_COST_CURVE_FREE = frozenset({"autoregressive", "prompt-lookup", "hf-assisted", *LLAMA_CPP_TOOL_METHODS})


# draft-model peers whose draft is not ours to reduce (--draft-vocab is refused for them)
_NO_DRAFT_VOCAB = frozenset({"hf-assisted", "llama.cpp-draft-simple", "llama.cpp-draft-simple-tuned"})


def uses_cost_curve(name: str) -> bool:
    """Whether method ``name`` chose its draft lengths from the target engine's cost curve."""
    return name not in _COST_CURVE_FREE


def _check_known(name: str) -> None:
    if name not in BUILDERS and not (name.startswith(WITHOUT) and name[len(WITHOUT) :] in ABLATIONS):
        choices = [*BUILDERS, *(WITHOUT + part for part in ABLATIONS)]
        raise UserError(f"unknown method {name!r}: choose from {', '.join(choices)}")


def parse_methods(spec: str) -> list[str]:
    """``"autoregressive,speculative"`` → a checked list of method names."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UserError("no method given")
    for name in names:
        _check_known(name)
    return list(dict.fromkeys(names))


def build_method(name: str, target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    """Build a method on the target; draft engines come from (and are closed with) ``pool``."""
    _check_known(name)
    if options.draft_vocab is not None and name in _NO_DRAFT_VOCAB:
        raise UserError(f"method {name!r} drafts with its own full model: --draft-vocab does not apply to it")
    if name.startswith(WITHOUT):  # retrieval with one more part switched off, under its own name
        ablated = tuple(dict.fromkeys([*options.ablate, name[len(WITHOUT) :]]))
        return _retrieval(name)(target, replace(options, ablate=ablated), pool)
    return BUILDERS[name](target, options, pool)
