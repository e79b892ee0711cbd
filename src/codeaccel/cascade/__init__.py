"""Model cascading with self-generated tests (Chen et al. 2024): the smallest model that vouches for its answer answers.

- :mod:`~codeaccel.cascade.config`: per model (k, l), the thresholds θ; valid combinations, enumerated
- :mod:`~codeaccel.cascade.problems`: HumanEval / MBPP problems with entry point, spec and reference solution
- :mod:`~codeaccel.cascade.self_tests`: the prompt that asks for tests; the assert lines kept from a reply
- :mod:`~codeaccel.cascade.scoring`: pass matrix -> scores (the paper's n_s · n_t, CodeT's dual agreement), accept
- :mod:`~codeaccel.cascade.store`: every generation and execution in SQLite, so sweeps replay
- :mod:`~codeaccel.cascade.cost`: measured seconds per token at each batch size; prices
- :mod:`~codeaccel.cascade.endpoint`: an OpenAI-compatible chat endpoint as a black-box stage
- :mod:`~codeaccel.cascade.generation`: one model's answers and self-tests, problems back to back in one batch
- :mod:`~codeaccel.cascade.run`: generation and sandboxed execution into the store, resumable
- :mod:`~codeaccel.cascade.replay`: one configuration over the store: per problem the answer taken, passed, cost
- :mod:`~codeaccel.cascade.tuner`: 30/70 split, Pareto fronts, the savings compared with single models
- :mod:`~codeaccel.cascade.report`: results rows, Markdown, the cost–accuracy PNG
- :mod:`~codeaccel.cascade.solve`: a chosen configuration answering one problem live, stage by stage
"""
