"""The personalization loop: the draft learns what this user accepts (SpeCoder).

* ``store``: accepted completions, and the completions the server served (so that a ``select``
  event names its text), in SQLite by default or PostgreSQL where servers share one store;
  every write acknowledged only once it is durable.
"""
