"""The decoding methods the benchmark and the CLI can run, by name.

A method is anything with ``name`` and ``generate(Request) -> Generation``. Each one is
built from the loaded target engine, :class:`MethodOptions`, and an
:class:`EnginePool` that loads (and later closes) shared draft engines; a new
method is one entry in :data:`BUILDERS`, and the harness needs no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from codeaccel.autoregressive import AutoregressiveMethod
from codeaccel.engines.base import Engine
from codeaccel.engines.pool import EnginePool
from codeaccel.errors import CodeaccelError
from codeaccel.generation import Generation, Request


class Method(Protocol):
    """``name`` is the method; ``settings`` what distinguishes two runs of it (draft model, k policy, ...),
    stored with every record; ``variant`` a short label of the settings for tables. A request's
    ``exclude_files`` names datastore files it must not draft from (a benchmark's own answer);
    methods without datastores ignore it."""

    name: str
    settings: dict
    variant: str

    def generate(self, request: Request) -> Generation: ...

    def close(self) -> None: ...


DEFAULT_DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class MethodOptions:
    """Settings some methods need beyond the target engine.

    draft_model: the drafter's model (default: the bundled 0.5B); draft_engine: the
    engine it runs on (default: the target's); draft_k: a fixed draft length instead
    of choosing k from the cost curve each step (>= 1).
    """

    draft_model: str | None = None
    draft_engine: str | None = None
    draft_k: int | None = None
    datastores: tuple[str, ...] = ()  # retrieval: datastore directories (default: the general one in the cache)
    ablate: tuple[str, ...] = ()  # retrieval: parts to switch off, from ABLATIONS

    def __post_init__(self) -> None:
        if self.draft_k is not None and self.draft_k < 1:
            raise CodeaccelError(f"the draft length k must be >= 1, got {self.draft_k}")
        unknown = set(self.ablate) - set(ABLATIONS)
        if unknown:
            raise CodeaccelError(f"unknown ablation {sorted(unknown)[0]!r}: choose from {', '.join(ABLATIONS)}")


# Parts of retrieval drafting that --ablate can switch off (the CodeSwift ablation study).
ABLATIONS = ("multi-source", "timing", "cache", "tree")
TREE_BRANCHES = 3  # branches of a retrieval token tree (the best path + 2 alternatives)


def _draft_engine(target: Engine, options: MethodOptions, pool: EnginePool) -> Engine:
    from codeaccel.drafters.draft_model import check_same_vocabulary

    engine = pool.get(
        options.draft_model or DEFAULT_DRAFT_MODEL,
        options.draft_engine or target.kind,
        n_ctx=target.n_ctx,
        dtype=target.dtype or "bfloat16",
    )
    check_same_vocabulary(engine, target)
    return engine


def _model_drafter(target: Engine, options: MethodOptions, pool: EnginePool, objective: str = "end-to-end"):
    """The draft-model drafter, its draft-length policy and its settings.

    Unless ``--draft-k`` fixes k, the policy gives a cap and the drafter stops by its
    confidence, priced by that same policy.
    """
    from codeaccel.cost_curve import cost_curve_for
    from codeaccel.draft_length import DraftLength
    from codeaccel.drafters.draft_model import DraftModelDrafter

    adaptive = options.draft_k is None
    length = DraftLength(
        cost_curve_for(target), objective=objective, fixed_k=options.draft_k, stop_by_confidence=adaptive
    )
    draft = _draft_engine(target, options, pool)
    settings = {"draft_model": draft.model_name, "draft_engine": draft.kind}
    if draft.dtype:  # hf only: a bf16 and a float32 draft are two settings
        settings["draft_dtype"] = draft.dtype
    if adaptive:
        settings["draft_stop"] = "confidence"
    return DraftModelDrafter(draft, pricing=length if adaptive else None), length, settings


def _speculative(objective: str) -> Callable[[Engine, MethodOptions, EnginePool], Method]:
    def build(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
        from codeaccel.speculative import SpeculativeMethod

        name = "speculative" if objective == "end-to-end" else "speculative-client-draft"
        drafter, draft_length, settings = _model_drafter(target, options, pool, objective)
        settings["draft_k"] = options.draft_k or "auto"
        return SpeculativeMethod(name, target, drafter, draft_length, settings)

    return build


RETRIEVAL_K_MAX = 16  # longest retrieved draft considered per step


def _retrieval_drafter(target: Engine, options: MethodOptions, rest: bool = False):
    """The retrieval drafter with every part on except those ablated; ``rest``: the REST-style peer."""
    from codeaccel.acceptance_cache import AcceptanceCache
    from codeaccel.cost_curve import cost_curve_for
    from codeaccel.datastore import open_datastores
    from codeaccel.drafters.retrieval import RetrievalDrafter
    from codeaccel.retrieval_timing import RetrievalTiming

    # REST: one general datastore, every retrieved draft verified (as a token tree), no cache
    off = {"multi-source", "timing", "cache"} if rest else set(options.ablate)
    stores = open_datastores(target, options.datastores)
    if "multi-source" in off:  # one source: the general one if there is one (REST's setting), else the first
        stores = [next((s for s in stores if s.kind == "general"), stores[0])]
    timing = None if "timing" in off else RetrievalTiming(cost_curve_for(target), k_max=RETRIEVAL_K_MAX)
    cache = None if "cache" in off else AcceptanceCache()
    settings: dict = {"datastores": [s.name for s in stores]}
    if off and not rest:
        settings["ablate"] = sorted(off)
    branches = 1 if "tree" in off else TREE_BRANCHES
    return RetrievalDrafter(stores, timing=timing, cache=cache, tree_branches=branches), settings


def _retrieval(rest: bool) -> Callable[[Engine, MethodOptions, EnginePool], Method]:
    def build(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
        from codeaccel.cost_curve import cost_curve_for
        from codeaccel.draft_length import DraftLength
        from codeaccel.speculative import SpeculativeMethod

        drafter, settings = _retrieval_drafter(target, options, rest)
        k = options.draft_k or RETRIEVAL_K_MAX  # the drafter's timing control picks within it
        name = "retrieval-rest" if rest else "retrieval"
        return SpeculativeMethod(name, target, drafter, DraftLength(cost_curve_for(target), fixed_k=k), settings)

    return build


def _hybrid(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    from codeaccel.cost_curve import cost_curve_for
    from codeaccel.draft_length import DraftLength
    from codeaccel.drafters.hybrid import HybridDrafter
    from codeaccel.speculative import SpeculativeMethod

    retrieval, settings = _retrieval_drafter(target, options)
    model, model_length, model_settings = _model_drafter(target, options, pool)
    settings.update(model_settings)
    loop_length = DraftLength(cost_curve_for(target), fixed_k=RETRIEVAL_K_MAX)
    return SpeculativeMethod("hybrid", target, HybridDrafter(retrieval, model, model_length), loop_length, settings)


def _prompt_lookup(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    if target.kind == "llama.cpp":
        from codeaccel.peers.llama_prompt_lookup import LlamaPromptLookupMethod

        return LlamaPromptLookupMethod(target)
    from codeaccel.peers.hf_generate import HFGenerateMethod

    return HFGenerateMethod("prompt-lookup", target, {"prompt_lookup_num_tokens": 10})


def _hf_assisted(target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    from codeaccel.peers.hf_generate import HFGenerateMethod

    if target.kind != "hf":
        raise CodeaccelError("method 'hf-assisted' runs transformers' assisted generation: it needs --engine hf")
    # transformers' assistant is a transformers model whatever engine our own drafters use (--draft-engine)
    assistant = _draft_engine(target, replace(options, draft_engine="hf"), pool)
    return HFGenerateMethod("hf-assisted", target, {}, assistant=assistant)


def variant_label(settings: dict) -> str:
    """A short label of a method's settings: ``qwen2.5-coder-0.5b-instruct on llama.cpp, k=4``."""
    parts = []
    if "draft_model" in settings:
        parts.append(f"{settings['draft_model']} on {settings['draft_engine']}")
    if settings.get("draft_k", "auto") != "auto":
        parts.append(f"k={settings['draft_k']}")
    parts += [
        f"{k}={v}" for k, v in settings.items() if k not in ("draft_model", "draft_engine", "draft_k", "draft_dtype")
    ]
    return ", ".join(parts)


BUILDERS: dict[str, Callable[[Engine, MethodOptions, EnginePool], Method]] = {
    "autoregressive": lambda target, options, pool: AutoregressiveMethod(target),
    # draft model; k chosen per step to maximise end-to-end tokens/s (falls back to plain decoding)
    "speculative": _speculative("end-to-end"),
    # draft model on the client, target on a server: k chosen to minimise target seconds per token
    "speculative-client-draft": _speculative("target"),
    # drafts from code datastores (general + repository), timing control and acceptance cache; no draft model
    "retrieval": _retrieval(rest=False),
    # the REST-style peer: one general datastore, every retrieved draft verified (as a tree), no cache
    "retrieval-rest": _retrieval(rest=True),
    "hybrid": _hybrid,  # retrieval first, the draft model when retrieval has nothing
    "prompt-lookup": _prompt_lookup,  # the engine library's own n-gram prompt lookup
    "hf-assisted": _hf_assisted,  # transformers' assisted generation with the same draft model
}


# methods that choose draft lengths from the target's cost curve (every one but these)
_COST_CURVE_FREE = frozenset({"autoregressive", "prompt-lookup", "hf-assisted"})


def uses_cost_curve(name: str) -> bool:
    """Whether method ``name`` chose its draft lengths from the target engine's cost curve."""
    return name not in _COST_CURVE_FREE


# ``retrieval-without-<part>``: retrieval with one part ablated, as its own method, so an
# ablation study runs interleaved with the full method and the baseline on every problem.
WITHOUT = "retrieval-without-"


def _check_known(name: str) -> None:
    if name not in BUILDERS and not (name.startswith(WITHOUT) and name[len(WITHOUT) :] in ABLATIONS):
        choices = [*BUILDERS, *(WITHOUT + part for part in ABLATIONS)]
        raise CodeaccelError(f"unknown method {name!r}: choose from {', '.join(choices)}")


def parse_methods(spec: str) -> list[str]:
    """``"autoregressive,speculative"`` → a checked list of method names."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise CodeaccelError("no method given")
    for name in names:
        _check_known(name)
    return list(dict.fromkeys(names))


def build_method(name: str, target: Engine, options: MethodOptions, pool: EnginePool) -> Method:
    """Build a method on the target; draft engines come from (and are closed with) ``pool``."""
    _check_known(name)
    if name.startswith(WITHOUT):
        ablated = tuple(dict.fromkeys([*options.ablate, name[len(WITHOUT) :]]))
        return BUILDERS["retrieval"](target, replace(options, ablate=ablated), pool)
    return BUILDERS[name](target, options, pool)
