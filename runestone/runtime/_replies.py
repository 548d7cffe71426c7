"""How an actor refuses a request without crashing.

A ``handle_call`` that raises crashes its actor; a bad request from an
operator (an unknown provider, a duplicate group) is not a crash. Such calls
reply with a :class:`Rejected` value instead, as ``gen_server`` replies
``{error, Reason}``; :func:`unwrap` turns it back into an exception on the
caller's side, where it belongs.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Rejected:
    """A call the actor refused. ``code``: ``"not_found"``, ``"conflict"`` or ``"invalid"``."""

    code: str
    message: str

    def exception(self) -> Exception:
        if self.code == "not_found":
            return LookupError(self.message)
        return ValueError(self.message)


def unwrap(reply: Any) -> Any:
    """The reply itself, or the exception a :class:`Rejected` reply stands for, raised.

    ``not_found`` raises ``LookupError``; ``conflict`` and ``invalid`` raise ``ValueError``.
    """
    if type(reply) is Rejected:
        raise reply.exception()
    return reply
