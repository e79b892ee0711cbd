"""Typed per-request stats of a decoding method, and their one serialisation for records.

Like vLLM's ``SpecDecodingStats``: the decode loop fills a :class:`DecodingStats`;
drafters contribute a :class:`DrafterStats`; ``to_record`` writes the JSON a
benchmark record stores and ``from_record`` reads one back (records written before
these classes existed have the same keys). Each field has one name in one place, so
two parts of a request's log can never overwrite each other.

Record keys: ``steps`` and ``target_s`` for every method of ours (peers measured
through another library have none); drafting methods add the :class:`SpecStats`
counters, their drafter's counters and ``cost_model`` (the learned costs and this
request's acceptance estimate at its end).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields


def tested(draft_len: int, n_accepted: int) -> int:
    """Draft tokens a verification judged: the accepted ones and the first rejected one, if any."""
    return n_accepted + (1 if n_accepted < draft_len else 0)


@dataclass
class SpecStats:
    """What was drafted and accepted, per request."""

    drafts: int = 0  # steps that verified a non-empty draft
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # draft tokens the target judged: the accepted ones and each draft's first rejected one (the tokens after it
    # were never tested): the per-token acceptance α of the geometric model is accepted / tested
    tested_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [position] drafts whose token at position was accepted
    proposed_at: list[int] = field(default_factory=list)  # [position] drafts that had a token at position
    chosen_k: Counter = field(default_factory=Counter)  # k -> steps
    draft_s: float = 0.0  # seconds in the drafter (decode only)
    draft_prefill_s: float = 0.0  # seconds in the drafter's start (during the prefill)

    @property
    def mean_accepted_len(self) -> float | None:
        """Tokens committed per verified draft (accepted + the recovered/bonus token)."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    def record(self, draft_len: int, n_accepted: int, judged: int | None = None) -> None:
        """One verification of a draft of ``draft_len`` tokens (a tree: its nodes); ``judged``: the tokens the
        target judged (``Verdict.judged``; None: a chain's, :func:`tested`)."""
        self.chosen_k[draft_len] += 1
        if draft_len == 0:
            return
        self.drafts += 1
        self.drafted_tokens += draft_len
        self.accepted_tokens += n_accepted
        self.tested_tokens += tested(draft_len, n_accepted) if judged is None else judged
        for arr, n in ((self.proposed_at, draft_len), (self.accepted_at, n_accepted)):
            arr.extend([0] * (n - len(arr)))
            for i in range(n):
                arr[i] += 1


@dataclass
class RetrievalCounts:
    """A retrieval drafter's counters for one request (a record keeps only those that happened)."""

    lookups: int = 0  # steps that searched the datastores
    skipped_lookups: int = 0  # steps timing control skipped (backing off)
    cache_hits: int = 0  # lookups the acceptance cache contributed to
    retrieved: int = 0  # lookups that found a continuation
    trees_declined: int = 0  # token trees cut to their main path (the cost curve is too steep)
    context_matches: int = 0  # steps whose longest match was in the request's own context
    prediction_matches: int = 0  # steps whose longest match was in the request's predicted output

    def to_record(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v}


@dataclass
class DrafterStats:
    """A drafter's own counters for one request (None: that drafter has no such counter)."""

    confidence_stops: int | None = None  # draft-model drafts ended early by confidence
    retrieval: RetrievalCounts | None = None
    draft_sources: dict[str, int] | None = None  # hybrid: steps by where the draft came from ("none": no draft)

    def to_record(self) -> dict:
        out: dict = {}
        if self.confidence_stops is not None:
            out["confidence_stops"] = self.confidence_stops
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval.to_record()
        if self.draft_sources is not None:
            out["draft_sources"] = dict(self.draft_sources)
        return out


@dataclass(frozen=True)
class CostModelReading:
    """The cost model at the end of a request: the shared learned costs and the request's own α."""

    t_target_ms: float
    batch_scale: float
    alpha: float | None = None  # None in records written before it was stored

    def to_record(self) -> dict:
        out = {"t_target_ms": round(self.t_target_ms, 3), "batch_scale": round(self.batch_scale, 3)}
        if self.alpha is not None:
            out["alpha"] = round(self.alpha, 4)
        return out


@dataclass
class DecodingStats:
    """One request's log, as the decode loop and its drafter filled it."""

    steps: int = 0  # target evaluations after the prefill
    target_s: float = 0.0  # seconds in target evaluations (decode only)
    speculation: SpecStats | None = None  # drafting methods
    drafter: DrafterStats | None = None
    cost_model: CostModelReading | None = None

    def to_record(self) -> dict:
        out: dict = {"steps": self.steps}
        if (s := self.speculation) is not None:
            out.update(
                drafts=s.drafts,
                drafted_tokens=s.drafted_tokens,
                accepted_tokens=s.accepted_tokens,
                mean_accepted_len=None if s.mean_accepted_len is None else round(s.mean_accepted_len, 4),
                acceptance_rate=None if s.acceptance_rate is None else round(s.acceptance_rate, 4),
                accepted_at=list(s.accepted_at),
                proposed_at=list(s.proposed_at),
                chosen_k={str(k): n for k, n in sorted(s.chosen_k.items())},
            )
        out["target_s"] = round(self.target_s, 6)
        if s is not None:
            out.update(draft_s=round(s.draft_s, 6), draft_prefill_s=round(s.draft_prefill_s, 6))
        if self.drafter is not None:
            out.update(self.drafter.to_record())
        if self.cost_model is not None:
            out["cost_model"] = self.cost_model.to_record()
        return out

    @classmethod
    def from_record(cls, record: dict | None) -> DecodingStats | None:
        """The stats a record stored (None for a peer's record, which has none)."""
        if not record or "steps" not in record:
            return None
        speculation = None
        if "drafts" in record:
            speculation = SpecStats(
                drafts=record["drafts"],
                drafted_tokens=record["drafted_tokens"],
                accepted_tokens=record["accepted_tokens"],
                accepted_at=list(record.get("accepted_at", [])),
                proposed_at=list(record.get("proposed_at", [])),
                chosen_k=Counter({int(k): n for k, n in record.get("chosen_k", {}).items()}),
                draft_s=record.get("draft_s", 0.0),
                draft_prefill_s=record.get("draft_prefill_s", 0.0),
            )
        drafter = None
        if any(k in record for k in ("confidence_stops", "retrieval", "draft_sources")):
            retrieval = record.get("retrieval")
            drafter = DrafterStats(
                confidence_stops=record.get("confidence_stops"),
                retrieval=None if retrieval is None else RetrievalCounts(**retrieval),
                draft_sources=record.get("draft_sources"),
            )
        cost = record.get("cost_model")
        known = {f.name for f in fields(CostModelReading)}
        return cls(
            steps=record["steps"],
            target_s=record.get("target_s", 0.0),
            speculation=speculation,
            drafter=drafter,
            cost_model=None if cost is None else CostModelReading(**{k: v for k, v in cost.items() if k in known}),
        )
