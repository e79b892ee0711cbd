"""One model's answers and self-tests for a run of problems, back to back through one batched decoder.

Per problem: the greedy answer and ``n_samples`` sampled ones (temperature 0.8, top-p 0.95,
seed = sample index), and per l in ``TEST_LS`` a greedy and ``n_samples`` sampled self-tests.
A problem's sequences come in groups sharing a prompt (its answers; its tests per l). Each
group is submitted whole, so the decoder prefills its prompt once and copies it, and the next
group, the next problem's included, joins the batch as soon as the batch has sequences for
all of it: a problem's long tail (a few answers still running after the rest stopped) does
not decode alone. A group larger than the batch, or one that finds too few free cache cells,
is admitted in parts, each part prefilled on its own. Each problem is handed over as soon as
all its sequences are done; an error (Ctrl-C, a prompt that does not fit) loses the problems
in flight, never one handed over. A sequence's tokens are what it gets decoded alone (greedy)
or drawn with its own seed (sampling), whatever runs beside it
(:mod:`codeaccel.decoding.batched`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from codeaccel.bench.harness import build_prompt
from codeaccel.cascade.config import SAMPLE_TEMPERATURE, GenerationKey
from codeaccel.cascade.problems import CascadeProblem
from codeaccel.cascade.self_tests import SelfTestFormat, self_test_prompt
from codeaccel.cascade.store import StoredGeneration
from codeaccel.decoding.batched import BatchDecoder, BatchStats
from codeaccel.decoding.generation import Generation, Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import Engine, SequenceSet

TEST_LS = (2, 4)  # test lines asked per self-test
TOP_P = 0.95


@dataclass(frozen=True)
class GenerationSettings:
    """What one model is asked per problem, and how many sequences decode at once."""

    n_samples: int
    max_tokens: int  # per answer
    test_format: SelfTestFormat
    n_seq_max: int


@dataclass
class _Planned:
    """One sequence a problem needs: what it is, its request, and its generation once done."""

    kind: str  # "answer" | "test"
    l: int  # noqa: E741 (the paper's name: test lines asked)
    sample: int  # -1 greedy, else the seed
    reply_prefix: str  # tests: the started "assert f(" belongs to the first line
    request: Request
    generation: Generation | None = None


@dataclass
class _Flight:
    """A problem whose sequences are being decoded (per-problem state of :func:`generate_problems`)."""

    cp: CascadeProblem
    plan: list[_Planned]
    left: int = 0
    steps0: int | None = None  # the decoder's counters when its first group was submitted: its mean batch
    sequences0: int = 0

    def __post_init__(self) -> None:
        self.left = len(self.plan)


Done = Callable[[CascadeProblem, list[StoredGeneration]], None]  # a problem's rows, when all are generated


def generate_problems(engine: Engine, seqs: SequenceSet, problems: Iterable[CascadeProblem],
                      settings: GenerationSettings, done: Done, answers: bool = True,
                      only: frozenset[GenerationKey] | None = None) -> None:  # fmt: skip
    """Every answer (unless not ``answers``) and test of ``problems`` for one model, handed to ``done``
    problem by problem as each completes (see the module); ``only``: just these (kind, l, sample)."""
    decoder = BatchDecoder(seqs, prefill_chunk=None)  # whole prompts: they are few, and nothing waits on them
    upcoming = iter(problems)
    groups: deque[tuple[_Flight, list[_Planned]]] = deque()  # prompt groups still to submit, in order
    owner: dict[int, tuple[_Flight, _Planned]] = {}  # handle -> its problem and place

    def plan_next() -> None:
        """The next problem with anything to generate: its groups queued (nothing left: none)."""
        for cp in upcoming:
            plan = _plan(engine, cp, settings, answers)
            flight = _Flight(cp, plan if only is None else [p for p in plan if (p.kind, p.l, p.sample) in only])
            if not flight.plan:
                done(cp, [])
                continue
            for _, same_prompt in itertools.groupby(flight.plan, key=lambda p: tuple(p.request.prompt_tokens)):
                groups.append((flight, list(same_prompt)))
            return

    plan_next()
    while groups or not decoder.idle:
        room = settings.n_seq_max - decoder.n_active - decoder.n_prefilling - decoder.n_waiting
        while groups and (len(groups[0][1]) <= room or decoder.idle):
            flight, group = groups.popleft()
            if flight.steps0 is None:
                flight.steps0, flight.sequences0 = decoder.stats.steps, decoder.stats.batched_sequences
            for planned in group:
                owner[decoder.submit(planned.request)] = (flight, planned)
            room -= len(group)
            if not groups:
                plan_next()  # the next problem is planned while this one's last group runs
        for handle, generation in decoder.step():
            flight, planned = owner.pop(handle)
            planned.generation = generation
            flight.left -= 1
            if flight.left == 0:
                done(flight.cp, _rows(engine, flight, decoder.stats))


def _plan(engine: Engine, cp: CascadeProblem, settings: GenerationSettings, answers: bool) -> list[_Planned]:
    """Every answer (unless not ``answers``) and test of one problem: the greedy one and ``n_samples`` sampled."""
    greedy = SamplingParams()

    def group(kind: str, n_lines: int, prefix: str, prompt: list[int], max_tokens: int, stop) -> list[_Planned]:
        return [_Planned(kind, n_lines, i, prefix, Request(prompt, greedy if i < 0 else _sampled(i), max_tokens, stop))
                for i in range(-1, settings.n_samples)]  # fmt: skip

    plan = []
    if answers:
        plan = group("answer", 0, "", build_prompt(engine, cp.problem), settings.max_tokens, cp.problem.stop)
    for n_lines in TEST_LS:
        tp = self_test_prompt(cp, n_lines, settings.test_format)
        text = tp.raw if tp.raw is not None else engine.apply_chat_template(tp.messages) + tp.response_prefix
        plan += group("test", n_lines, tp.response_prefix, engine.tokenize(text), tp.max_tokens, tp.stop)
    return plan


def _sampled(seed: int) -> SamplingParams:
    return SamplingParams(temperature=SAMPLE_TEMPERATURE, top_p=TOP_P, seed=seed)


def _rows(engine: Engine, flight: _Flight, stats: BatchStats) -> list[StoredGeneration]:
    steps = stats.steps - (flight.steps0 or 0)
    batch = (stats.batched_sequences - flight.sequences0) / steps if steps else 0.0  # since its first group joined
    cp = flight.cp
    return [
        StoredGeneration(
            model=engine.model_name,
            dataset=cp.dataset,
            task_id=cp.task_id,
            kind=p.kind,
            l=p.l,
            sample=p.sample,
            temperature=p.request.params.temperature,
            top_p=p.request.params.top_p,
            prompt_tokens=len(p.request.prompt_tokens),
            tokens=p.generation.n_generated,
            text=p.reply_prefix + p.generation.text,
            finish_reason=p.generation.finish_reason,
            cost_s=round(p.generation.cost_s or 0.0, 6),
            decode_s=round(p.generation.decode_s, 6),
            prefill_s=round(p.generation.prefill_s, 6),
            batch_size=round(batch, 3),
        )
        for p in flight.plan
    ]
