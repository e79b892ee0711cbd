"""The exceptions codeaccel raises on purpose, by kind.

Every message is one complete line that says what is wrong and what to do. The
kinds decide who is at fault, so that each caller maps them in one place:

* :class:`UserError`: the input is wrong (an unknown model, a missing file, a bad
  sampling value, a prompt that does not fit). The CLI prints it and exits with 2;
  the server answers 4xx with an OpenAI-style error body.
* :class:`SetupError`: this machine lacks something the request needs (a package,
  a model's part files, a datastore's recorded source). The CLI prints it and exits
  with 2; the server answers 503.
* :class:`InternalError`: an invariant of codeaccel itself broke (an engine asked
  to rewind past its cache, a token tree that is not one): a bug. The CLI exits with
  1; the server answers 500.

:class:`CodeaccelError` is their common base, for code that handles all three alike.
"""


class CodeaccelError(Exception):
    """Any error codeaccel raises on purpose: the message is a complete, one-line explanation."""


class UserError(CodeaccelError, ValueError):
    """The user's input or request is wrong (CLI: exit 2; server: 4xx)."""


class SetupError(CodeaccelError):
    """The environment lacks something: a package, a model part, a datastore's source (CLI: exit 2; server: 503)."""


class InternalError(CodeaccelError, RuntimeError):
    """An invariant of codeaccel broke: a bug, not the user's doing (CLI: exit 1; server: 500)."""
