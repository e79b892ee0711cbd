"""The one exception type users see.

Anything that is the user's mistake or the environment's (unknown model, missing
file, bad sampling value) raises :class:`CodeaccelError` with a one-line message
that says what to do. The CLI prints it without a traceback; the server (later)
maps it to a 4xx with an OpenAI-style error body.
"""


class CodeaccelError(ValueError):
    """A user-facing error: the message is a complete, one-line explanation."""
