"""Retry policy: whether another attempt may follow a failed one, and after what pause.

A ``RetryPolicy`` is a small immutable callable: given the failure, how many
attempts were made, whether any byte already reached the client, and how much
of the request's deadline is left, it answers ``None`` (stop) or the pause in
seconds before the next attempt. It never sleeps and never calls anything: the
caller owns the loop, so the attempt runs again in the caller's cancel scope.
Pauses grow exponentially (``base_delay * factor ** (attempt - 1)``, capped at
``max_delay``) with optional jitter; an upstream's ``Retry-After`` is a floor the
pause never goes below, bounded only by the request's deadline.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Iterable, Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

import attrs

from runestone.resilience.errors import is_retryable

__all__ = ["RetryPolicy", "retry_policy", "parse_retry_after", "JITTER_MODES"]

#: "full": uniform in [0, backoff]; "equal": backoff/2 plus uniform in [0, backoff/2];
#: "none": exactly the backoff.
JITTER_MODES = ("full", "equal", "none")


def _jitter_mode(value: bool | str) -> str:
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value in JITTER_MODES:
        return value
    raise ValueError(f"jitter must be a bool or one of {JITTER_MODES}, got {value!r}")


@attrs.frozen(repr=False)
class RetryPolicy:
    """Exponential backoff with jitter, bounded attempts, Retry-After honoured.

    ``attempt`` counts attempts already made, from 1: after the first attempt
    failed, ``attempt`` is 1 and its pause is ``base_delay`` (before jitter).
    """

    max_attempts: int = 3
    base_delay: float = 0.1
    factor: float = 2.0
    max_delay: float = 5.0
    jitter: str = attrs.field(default="full", converter=_jitter_mode)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> RetryPolicy:
        """From the ``[retry]`` configuration (its times are in milliseconds)."""
        return cls(
            max_attempts=cfg.max_attempts,
            base_delay=cfg.base_delay_ms / 1000.0,
            factor=cfg.backoff_factor,
            max_delay=cfg.max_delay_ms / 1000.0,
            jitter=cfg.jitter,
        )

    def __repr__(self) -> str:
        return (
            f"retry_policy(max_attempts={self.max_attempts}, base_delay={self.base_delay}, "
            f"factor={self.factor}, max_delay={self.max_delay}, jitter={self.jitter!r})"
        )

    def backoff(self, attempt: int) -> float:
        """The pause after ``attempt`` failed attempts, before jitter."""
        exponent = attempt - 1 if attempt > 1 else 0
        try:
            raw = self.base_delay * self.factor**exponent
        except OverflowError:
            return self.max_delay
        return raw if raw < self.max_delay else self.max_delay

    def delay(self, attempt: int, retry_after: float | None = None, rng: Any = _random) -> float:
        """The pause before the next attempt, in seconds.

        Jittered backoff, but never shorter than the upstream's ``retry_after``:
        that one is the upstream telling us when it will serve again, so it wins
        over ``max_delay`` (the request deadline still bounds it; see ``__call__``).
        """
        pause = self.backoff(attempt)
        mode = self.jitter
        if mode == "full":
            pause = rng.uniform(0.0, pause)
        elif mode == "equal":
            half = pause / 2
            pause = half + rng.uniform(0.0, half)
        if retry_after is not None and retry_after > pause:
            return retry_after
        return pause

    def should_retry(self, error: object, attempt: int, bytes_sent_to_client: bool) -> bool:
        """Is another attempt allowed after ``attempt`` attempts ended with ``error``?

        Never once a byte reached the client: a second answer cannot be spliced
        into the first. Never past ``max_attempts``, and only for errors that
        another attempt could fix (``is_retryable``).
        """
        if bytes_sent_to_client or attempt >= self.max_attempts:
            return False
        return is_retryable(error)

    def __call__(
        self,
        error: object,
        attempt: int,
        *,
        bytes_sent_to_client: bool = False,
        time_left: float | None = None,
        rng: Any = _random,
    ) -> float | None:
        """``None`` if there is to be no further attempt, else the pause before it.

        ``time_left`` is what remains of the request's deadline: when the pause
        would use it all up there is no point in waiting, and the answer is ``None``.
        """
        if not self.should_retry(error, attempt, bytes_sent_to_client):
            return None
        pause = self.delay(attempt, getattr(error, "retry_after", None), rng)
        if time_left is not None and pause >= time_left:
            return None
        return pause


def retry_policy(**kw: Any) -> RetryPolicy:
    """Build a ``RetryPolicy``: ``retry_policy(max_attempts=5, jitter="equal")``."""
    return RetryPolicy(**kw)


def _header_items(headers: Any) -> Iterable[tuple[Any, Any]]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    multi = getattr(headers, "multi_items", None)  # httpx.Headers
    if multi is not None:
        return multi()
    return headers


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    return str(value)


def parse_retry_after(headers: Any, *, now: float | None = None) -> float | None:
    """The pause an upstream asked for, in seconds, or ``None`` if it asked for none.

    ``headers`` is a mapping, ``httpx.Headers`` or a sequence of ``(name, value)``
    pairs (``str`` or ``bytes``); names match case-insensitively. ``retry-after-ms``
    (OpenAI's, milliseconds) wins over ``retry-after`` (delta seconds or an HTTP
    date, measured from ``now``, wall-clock seconds since the epoch, default the
    current time). Values in the past give 0; unparsable values are ignored.
    """
    seconds_value = None
    for name, value in _header_items(headers):
        lname = _text(name).lower()
        if lname == "retry-after-ms":
            try:
                ms = float(_text(value).strip())
            except ValueError:
                continue
            if ms == ms and ms != float("inf"):  # NaN and infinity are not pauses
                return max(ms, 0.0) / 1000.0
        elif lname == "retry-after":
            seconds_value = _text(value).strip()
    if seconds_value is None or not seconds_value:
        return None
    try:
        seconds = float(seconds_value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds == float("inf"):
            return None
        return max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(seconds_value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # "-0000": HTTP dates are GMT anyway
    if now is None:
        now = time.time()
    return max(when.timestamp() - now, 0.0)
