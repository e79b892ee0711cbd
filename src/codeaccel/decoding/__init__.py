"""Decoding: turning an engine's logits into a completion.

The request and its result (``generation``), sampling, the autoregressive
baseline, many requests decoded in one batch (``batched``) with their drafts' lengths
chosen together (``batch_draft_lengths``) and a draft model drafting for the whole batch
(``batch_draft_model``), and speculative
decoding: the loop (``speculative``), the lossless acceptance rules
(``verification``), the draft-length policy and the costs it learns
(``draft_length``, ``costs``), the drafter contract (``drafter``) and the
draft-model drafter (``draft_model``), and the typed per-request stats (``stats``).
"""
