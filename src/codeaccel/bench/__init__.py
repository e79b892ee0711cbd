"""Benchmarks: every method on the same problems, with the same tests; headless (nothing here draws).

The problems (``problem``; ``datasets`` for HumanEval and MBPP, ``repo_dataset`` for the
repository-level set, ``edit_dataset`` for edit sets from a project's git history, packaged
in ``data/``), the harness that runs and rescores them (``harness``), a whole
benchmark into one results folder (``run``), the resumable results (``store``), the
target's logit noise (``logit_noise``), the summary and its files (``report``), and the
lookup-latency and sandbox-throughput benchmarks (``lookup_bench``, ``sandbox_bench``), and
the server load test: its requests and measurements (``load_test``) and the servers it
starts (``load_servers``).
"""
