"""The draft's LoRA fine-tuning and the acceptance it is judged by (tiny transformers models).

Contract: replaying drafts over match flags counts exactly what greedy speculative decoding
commits; fine-tuning lowers the loss on its examples, leaves the base model as it was, and
writes a peft adapter and a GGUF one; a draft tuned on the target's continuations is accepted
more on them; the hf engine swaps the adapter in and out.
"""

from __future__ import annotations

import numpy as np
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.errors import CodeaccelError, UserError
from codeaccel.personalization.acceptance import AcceptanceStats, Continuation, measure_acceptance, replay
from codeaccel.personalization.distill import TeacherTop, check_teach, teacher_top_k, top_k_of
from codeaccel.personalization.finetune import TrainingExample, TuneConfig, finetune, soft_cross_entropy

PROMPTS = ["def add(a, b):\n", "import json\n", "class Decoder:\n", "    for i in range(", "x = [1, 2]\n",
           "def parse(text):\n", "    return ", "if __name__ == "]  # fmt: skip


def test_replay_counts_what_greedy_speculation_commits():
    # k = 2 over T T F T T T F: calls commit [T T] + bonus (3), then F -> 1, then [T T] + bonus ... ends at 7
    stats = replay([True, True, True, False, True, True, False], k=2)
    # positions: 0-1 accepted, 2 is the target's own (3 tokens); 3 accepted? drafts at 3..4: T? index 3 is False
    assert (stats.verifications, stats.committed_tokens) == (3, 7)
    assert stats.accepted_tokens == 2 + 0 + 2 and stats.drafted_tokens == 2 + 2 + 2
    assert stats.mean_accepted_len == pytest.approx(7 / 3)
    all_wrong = replay([False] * 5, k=4)
    assert all_wrong.mean_accepted_len == 1.0 and all_wrong.acceptance_rate == 0.0
    all_right = replay([True] * 10, k=4)
    assert all_right.verifications == 2 and all_right.committed_tokens == 10  # 5 + 5 (4 drafted, 1 bonus)
    with pytest.raises(CodeaccelError):
        replay([True], k=0)


@pytest.fixture(scope="module")
def pair(tiny_hf, tiny_hf_draft):
    target = load_engine(tiny_hf, "hf", dtype="float32", n_ctx=512)
    draft = load_engine(tiny_hf_draft, "hf", dtype="float32", n_ctx=512)
    yield target, draft
    draft.close()
    target.close()


def _continuations(target, n_tokens=24):
    out = []
    for text in PROMPTS:
        prompt = target.tokenize(text)
        target.reset()
        tokens = generate(target, prompt, SamplingParams(), n_tokens).tokens
        out.append(Continuation(tuple(prompt), tuple(tokens)))
    return out


def test_tuning_on_the_targets_continuations_raises_acceptance_and_leaves_the_base(pair, tmp_path):
    target, draft = pair
    held = _continuations(target)
    before = measure_acceptance(draft, held, k=4)
    probe = draft.tokenize(PROMPTS[0])
    base_logits = draft.eval(probe)
    draft.reset()
    examples = [TrainingExample(c.prompt_tokens, c.target_tokens) for c in held]
    steps = []
    config = TuneConfig(rank=8, alpha=16, learning_rate=1e-2, epochs=12, max_seconds=120, permute_qk=False)
    report = finetune(draft.model, examples, config, tmp_path, progress=lambda s, t, loss: steps.append((s, t)))
    assert report.steps == len(examples) * 12 == len(steps) and steps[-1] == (report.steps, report.steps)
    assert report.stopped_by == "epochs" and report.peak_rss_mb > 0
    assert np.mean(report.losses[-8:]) < 0.5 * np.mean(report.losses[:8])
    assert (report.adapter_dir / "adapter_config.json").is_file() and report.gguf_path.is_file()
    np.testing.assert_allclose(draft.eval(probe), base_logits, atol=1e-5)  # the base is untouched
    draft.set_lora(report.adapter_dir)
    after = measure_acceptance(draft, held, k=4)
    draft.set_lora(None)
    assert after.mean_accepted_len > before.mean_accepted_len + 0.5
    assert measure_acceptance(draft, held, k=4).mean_accepted_len == before.mean_accepted_len  # swapped back


def test_the_gguf_adapter_of_a_tuning_loads_in_llama_cpp(pair, tiny_gguf_draft, tmp_path):
    _, draft = pair
    examples = [TrainingExample(tuple(draft.tokenize(p)), tuple(draft.tokenize(" pass\n"))) for p in PROMPTS]
    report = finetune(draft.model, examples, TuneConfig(epochs=1, learning_rate=5e-2, permute_qk=False), tmp_path)
    engine = load_engine(tiny_gguf_draft, n_ctx=256)
    try:
        tokens = engine.tokenize(PROMPTS[0])
        base = engine.eval(tokens)
        engine.set_lora(report.gguf_path)
        assert np.abs(engine.eval(tokens) - base).max() > 1e-3
    finally:
        engine.close()


def test_a_versions_adapter_is_applied_in_each_engines_form_by_a_sequence_set_and_the_follower(pair, tmp_path):
    from codeaccel.engines import open_sequences
    from codeaccel.personalization.versions import DraftVersions
    from codeaccel.serve.draft_follow import DraftFollower

    _, draft = pair
    versions = DraftVersions(tmp_path / "versions")
    version = versions.create()
    examples = [TrainingExample(tuple(draft.tokenize(p)), tuple(draft.tokenize(" pass\n"))) for p in PROMPTS]
    finetune(draft.model, examples, TuneConfig(epochs=2, learning_rate=5e-2, permute_qk=False), version.path)
    versions.record(version.name, status="validated")
    versions.promote(version.name)
    assert version.adapter_for("hf") == version.adapter_dir and version.adapter_for("llama.cpp") == version.gguf
    assert (version.adapter_dir / "adapter_config.json").is_file() and version.gguf.is_file()
    probe = draft.tokenize(PROMPTS[1])

    def last_row(seqs):
        seq = seqs.open()
        try:
            return seqs.eval({seq: probe}, all_logits=False)[seq][-1]
        finally:
            seqs.close(seq)

    with open_sequences(draft, n_seq_max=2, n_ctx=256) as seqs:  # the server's draft sequences on hf
        base = last_row(seqs)
        applied = []
        follower = DraftFollower(versions, lambda path: (applied.append(path), seqs.set_lora(path)), seqs.engine.kind,
                                 scheduler=None, metrics=None, poll_s=60)  # fmt: skip
        follower.apply_now()  # what the server does before serving: peft's folder on hf, not the GGUF file
        assert applied == [version.adapter_dir] and follower.live == version.name
        tuned = last_row(seqs)
        assert np.abs(tuned - base).max() > 1e-3
        draft.reset()
        np.testing.assert_allclose(tuned, draft.eval(probe)[-1], atol=1e-4)  # the engine's own view agrees
        seqs.set_lora(None)
        np.testing.assert_allclose(last_row(seqs), base, atol=1e-5)
    draft.set_lora(None)


def test_limits_stop_the_training(pair, tmp_path):
    _, draft = pair
    examples = [TrainingExample(tuple(draft.tokenize(p)), tuple(draft.tokenize(" pass"))) for p in PROMPTS]
    by_steps = finetune(draft.model, examples, TuneConfig(max_steps=3, permute_qk=False), tmp_path / "a")
    assert (by_steps.steps, by_steps.stopped_by) == (3, "max_steps")
    by_time = finetune(draft.model, examples, TuneConfig(epochs=50, max_seconds=0.2, permute_qk=False), tmp_path / "b")
    assert by_time.stopped_by == "max_seconds" and by_time.steps < len(examples) * 50
    with pytest.raises(UserError, match="rank >= 1"):
        TuneConfig(rank=0)
    assert AcceptanceStats().mean_accepted_len == 0.0


def test_acceptance_by_k_replays_one_evaluation_per_example(pair):
    from codeaccel.personalization.acceptance import measure_acceptance_by_k

    target, draft = pair
    held = _continuations(target, n_tokens=12)[:3]
    by_k = measure_acceptance_by_k(draft, held, (1, 4, 8))
    for k in (1, 4, 8):
        assert by_k[k].to_record() == measure_acceptance(draft, held, k=k).to_record()
    assert by_k[1].drafted_tokens == by_k[1].verifications  # one token a draft


def test_top_k_keeps_the_most_probable_tokens_with_their_true_probabilities():
    logits = np.log(np.array([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    top = top_k_of(logits, 2)
    assert top.ids[0].tolist() == [1, 3] and top.ids[1, 0] == 0 and top.ids[1, 1] in (1, 2, 3)  # a three-way tie
    np.testing.assert_allclose(top.probs[0], [0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(top.probs[1], [0.7, 0.1], rtol=1e-6)
    assert top_k_of(logits, 99).ids.shape == (2, 4)  # k capped at the vocabulary
    record = top.to_record()
    assert TeacherTop.from_record(record).ids.tolist() == top.ids.tolist()
    with pytest.raises(CodeaccelError):
        TeacherTop(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(CodeaccelError):  # a distribution per completion token
        TrainingExample((1, 2), (3, 4, 5), TeacherTop(np.zeros((2, 1), dtype=np.int64), np.ones((2, 1), np.float32)))
    assert check_teach("distill") == "distill"
    with pytest.raises(CodeaccelError, match="distill"):
        check_teach("guess")


def test_soft_cross_entropy_is_cross_entropy_for_a_certain_teacher_and_renormalises():
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    tokens = torch.tensor([0, 3])
    hard = torch.nn.functional.cross_entropy(logits, tokens)
    one_hot = soft_cross_entropy(logits, tokens[:, None], torch.tensor([[0.3], [0.9]]), torch)  # renormalised to 1
    assert float(one_hot) == pytest.approx(float(hard), rel=1e-6)
    p = torch.tensor([[0.6, 0.2], [0.5, 0.5]])
    ids = torch.tensor([[0, 1], [2, 3]])
    log_q = torch.log_softmax(logits, dim=-1)
    expected = -(0.75 * log_q[0, 0] + 0.25 * log_q[0, 1] + 0.5 * log_q[1, 2] + 0.5 * log_q[1, 3]) / 2
    assert float(soft_cross_entropy(logits, ids, p, torch)) == pytest.approx(float(expected), rel=1e-6)


def test_the_teachers_distribution_is_what_the_target_computes_and_its_argmax_the_continuation(pair):
    target, _ = pair
    prompt = target.tokenize(PROMPTS[0])
    target.reset()
    tokens = generate(target, prompt, SamplingParams(), 12).tokens
    cached = teacher_top_k(target, prompt, tokens, k=8)  # the prompt still cached from generating
    target.reset()
    fresh = teacher_top_k(target, prompt, tokens, k=8)
    target.reset()
    assert cached.ids.shape == (len(tokens), 8) and cached.ids[:, 0].tolist() == list(tokens)  # greedy = top 1
    np.testing.assert_allclose(cached.probs, fresh.probs, atol=1e-5)
    assert np.all(np.diff(cached.probs, axis=-1) <= 1e-7) and np.all(cached.probs.sum(-1) <= 1 + 1e-5)


def test_distilling_the_targets_distributions_raises_acceptance(pair, tmp_path):
    target, draft = pair
    held = _continuations(target)
    before = measure_acceptance(draft, held, k=4)
    examples = [TrainingExample(c.prompt_tokens, c.target_tokens, teacher_top_k(target, c.prompt_tokens,
                                                                               c.target_tokens, k=16))
                for c in held]  # fmt: skip
    target.reset()
    config = TuneConfig(rank=8, alpha=16, learning_rate=1e-2, epochs=12, max_seconds=120, permute_qk=False)
    report = finetune(draft.model, examples, config, tmp_path)
    assert np.mean(report.losses[-8:]) < 0.5 * np.mean(report.losses[:8])
    draft.set_lora(report.adapter_dir)
    after = measure_acceptance(draft, held, k=4)
    draft.set_lora(None)
    assert after.mean_accepted_len > before.mean_accepted_len + 0.5
