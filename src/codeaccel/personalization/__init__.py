"""The personalization loop: the draft learns what this user accepts (SpeCoder).

* ``store``: accepted completions, and the completions the server served (so that a ``select``
  event names its text), in SQLite by default or PostgreSQL where servers share one store;
  every write acknowledged only once it is durable;
* ``completion_cache``: SpeCoder's LRU of completions (prompt → completion), thread-safe, shared by
  a client's or a server's requests;
* ``acceptance``: a draft's mean accepted length against the target's continuations;
* ``distill``: what a tuned draft learns from: the accepted text, the target's greedy tokens, or
  its distributions (the teacher's top k at each position);
* ``finetune``: LoRA fine-tuning of the draft with peft, bounded in time, tokens and memory;
* ``lora_gguf``: the adapter as a GGUF file llama.cpp applies to the quantised base;
* ``versions``: the tuned versions, one live, promote and rollback; one tuning at a time;
* ``loop``: tune, validate against the live draft, promote only if strictly better;
* ``auto_tune``: the loop started by itself at a threshold, as a bounded child process;
* ``bench``: the benchmark of a simulated user: tuned on part of a project, measured on the rest.
"""
