"""The draft on the user's machine, the target on the server (SpeCoder's split).

* ``client``: :class:`RemoteDraftClient`, the local draft model's loop against ``POST /v1/verify``:
  draft k tokens, have the server's target verify them in its continuous batch, commit what it
  returns; the text is the target's (greedy) or has its distribution (sampling);
* ``split_bench``: the split on loopback, c clients with their drafts against the server alone.
"""
