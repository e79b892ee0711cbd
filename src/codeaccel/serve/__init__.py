"""``codeaccel serve``: an OpenAI- and llama.cpp-compatible completion server with continuous batching.

One target model, one :class:`~codeaccel.engines.sequences.SequenceSet` of ``parallel``
sequences, one scheduler thread that runs every active request's next step in one
engine evaluation. Modules:

* ``settings``: typed settings from flags, environment or a config file;
* ``schemas``: every endpoint's request body, validated at the boundary;
* ``prompts``: token ids of plain, fill-in-the-middle, repository-level infill and chat prompts;
* ``scheduler``: the thread that owns the batch decoder; jobs submitted, cancelled, reported;
* ``completions``: one HTTP request's choices submitted together, awaited or streamed (``Call``);
* ``streaming``: what a stream may send yet (no text a stop string may cut, no half character);
* ``formats``: OpenAI's and llama-server's response bodies and stream chunks;
* ``metrics``: Prometheus metrics (vLLM's and llama.cpp's speculative counter names);
* ``events``: ``/v1/events`` (Tabby's schema), stored durably in SQLite;
* ``sessions``: ``/v1/verify`` sessions, each remote draft client's committed context;
* ``draft_follow``: the draft model follows a folder of tuned versions (the live one, swapped between steps);
* ``errors``: every error mapped in one place to an OpenAI-style body;
* ``access``: the API key (401 without it) and every response counted by route and status;
* ``body_limit``: a body over the limit refused with 413, with or without a length;
* ``app``: ``create_app(settings)``, the routes, loading in the background (``/health`` 503 until loaded,
  or once the decoding thread stopped);
* ``replicas``: the same app as N replicas on Ray Serve behind one port.
"""
