"""Field checks: each setting carries its own check and the words for what it allows, so a type error and a
range error read the same; plus the one parser for upstream URLs and the host allow-list. Knows nothing
of the schema."""

from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs

# Field helpers: each setting carries its own check and the words for what it
# allows, so a type error and a range error read the same.


@attrs.frozen
class _Check:
    """A predicate on a structured value and the phrase saying what passes (or a function making the
    phrase when it is shown, for a registry that may grow: see :func:`_one_of`)."""

    test: Callable[[Any], bool] = attrs.field(repr=False)
    phrase: str | Callable[[], str]

    @property
    def allowed(self) -> str:
        return self.phrase() if callable(self.phrase) else self.phrase

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def _int_at_least(low: int) -> _Check:
    return _Check(lambda v: v >= low, f"an integer >= {low}")


def _int_between(low: int, high: int) -> _Check:
    return _Check(lambda v: low <= v <= high, f"an integer in {low}..{high}")


def _optional_int_at_least(low: int) -> _Check:
    return _Check(lambda v: v is None or v >= low, f"an integer >= {low}")


def _number_at_least(low: float) -> _Check:
    return _Check(lambda v: v >= low, f"a number >= {low:g}")


def _number_above(low: float) -> _Check:
    return _Check(lambda v: v > low, f"a number > {low:g}")


def _number_in(low: float, high: float, *, low_open: bool = False) -> _Check:
    # Chained comparisons are False for NaN, and an infinity is above any bound.
    shown = f"{int(high)}" if float(high).is_integer() else f"{high:g}"
    if low_open:
        return _Check(lambda v: low < v <= high, f"a number > {low:g} and <= {shown}")
    return _Check(lambda v: low <= v <= high, f"a number in {low:g}..{shown}")


def _optional_int_between(low: int, high: int) -> _Check:
    return _Check(lambda v: v is None or low <= v <= high, f"an integer in {low}..{high}")


def _fraction(*, zero_ok: bool = True) -> _Check:
    if zero_ok:
        return _Check(lambda v: 0.0 <= v <= 1.0, "a number in 0..1")
    return _Check(lambda v: 0.0 < v <= 1.0, "a number > 0 and <= 1")


def _one_of(choices: Collection[str]) -> _Check:
    """One of ``choices``, read when checked: a registry (``orderings.py``) counts its entries of the moment."""
    return _Check(lambda v: isinstance(v, str) and v in choices, lambda: "one of " + ", ".join(choices))


def _non_empty_str() -> _Check:
    return _Check(lambda v: bool(v.strip()), "a non-empty string")


def _strings() -> _Check:
    return _Check(
        lambda v: all(s.strip() for s in v), "an array of non-empty strings"
    )


def _distinct_strings() -> _Check:
    return _Check(
        lambda v: all(s.strip() for s in v) and len(set(v)) == len(v),
        "an array of distinct non-empty strings",
    )


# What a host (and port) may be made of: a DNS name (punycode for non-ASCII ones), IPv4, or [IPv6].
_AUTHORITY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:[]")
_USERINFO_CHARS = _AUTHORITY_CHARS | frozenset("~!$&'()*+,;=%@")


def parse_upstream_url(url: str, *, userinfo: bool = False) -> SplitResult:
    """``url`` split by the one parser the gateway uses for upstream URLs (``urllib.parse.urlsplit``,
    as the fast transport does), after refusing everything two parsers could read differently.

    Raises ValueError saying what is wrong: not printable ASCII (control characters such as CR or LF,
    spaces, backslashes), a scheme other than http/https, no host, user info (unless ``userinfo``, as a
    proxy may carry credentials), a query or fragment, or an invalid port. So ``http://X#@127.0.0.1`` is
    refused rather than shown as 127.0.0.1 while requests go to X.
    """
    if not url.isascii() or any(c <= " " or c in "\\\x7f" for c in url):
        raise ValueError("must be printable ASCII: no spaces, backslashes or control characters such as CR or LF")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(parts.scheme.lower() + "://"):
        raise ValueError("must start with http:// or https://")
    if "#" in url or "?" in url:
        raise ValueError("must have no query or fragment ('?' or '#')")
    allowed = _USERINFO_CHARS if userinfo else _AUTHORITY_CHARS
    if "@" in parts.netloc and not userinfo:
        raise ValueError("must have no user info ('user@'): send credentials as api_key")
    if not allowed.issuperset(parts.netloc):
        raise ValueError("must have a host of letters, digits, '-', '.', an IPv4 or a [bracketed] IPv6 address")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.port == 0:  # raises ValueError for a port out of range or not a number
        raise ValueError("must have a port in 1..65535")
    return parts


def _url_check(*, userinfo: bool) -> _Check:
    def ok(v: str | None) -> bool:
        if v is None:
            return True
        try:
            parse_upstream_url(v, userinfo=userinfo)
        except ValueError:
            return False
        return True

    extra = "" if userinfo else ", no user info"
    return _Check(ok, f"an http:// or https:// URL of printable ASCII with a host{extra}, no query or fragment")


def _http_url() -> _Check:
    return _url_check(userinfo=False)


def _server_url(schemes: tuple[str, ...]) -> _Check:
    """A URL of one of ``schemes`` with a host (user info allowed: it is a server's credential)."""

    def ok(v: str | None) -> bool:
        if v is None:
            return True
        if not v.isascii() or not v.isprintable():
            return False
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return False
        return parts.scheme in schemes and bool(parts.hostname) and not parts.fragment

    return _Check(ok, f"a {' or '.join(s + '://' for s in schemes)} URL of printable ASCII with a host")


def _proxy_url() -> _Check:
    return _url_check(userinfo=True)


def _is_host_pattern(v: str) -> bool:
    host = v[2:] if v.startswith("*.") else v
    return bool(host) and _AUTHORITY_CHARS.issuperset(host)


def upstream_host_allowed(url: str | None, hosts: Collection[str]) -> bool:
    """Is ``url``'s host in the allow-list ``hosts`` (``[admin] upstream_hosts``; empty allows any)?

    An entry is a host name or address, compared case-insensitively, or ``*.example.com`` for any
    name under example.com. ``url`` is parsed as it will be used (:func:`parse_upstream_url`).
    """
    if not hosts or url is None:
        return True
    try:
        host = parse_upstream_url(url).hostname or ""
    except ValueError:
        return False
    for entry in hosts:
        entry = entry.lower().strip("[]")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _is_name(v: str) -> bool:
    # Names end up in URLs of the admin API and in metric labels.
    return 0 < len(v) <= 64 and _NAME_CHARS.issuperset(v)


def _name() -> _Check:
    return _Check(_is_name, "a name of 1 to 64 letters, digits, '-', '_' or '.'")


def _mask(value: object) -> str:
    return "'***'" if value else repr(value)


def _mask_all(values: tuple[str, ...]) -> str:
    return "(" + ", ".join("'***'" for _ in values) + ")"


def _setting(
    default: Any = attrs.NOTHING,
    check: _Check | None = None,
    *,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
    repr_: Callable[[Any], str] | None = None,
) -> Any:
    metadata: dict[str, Any] = {}
    if check is not None:
        metadata["check"] = check
    if secret:
        metadata["secret"] = True
    return attrs.field(
        default=default,
        factory=factory,
        metadata=metadata,
        repr=repr_ or (_mask if secret else True),
    )


def _seconds(ms_field: str) -> property:
    def get(self: Any) -> float:
        return getattr(self, ms_field) / 1000.0

    return property(get, doc=f"``{ms_field}`` in seconds.")


def _weights() -> _Check:
    return _Check(
        lambda v: all(0 <= w <= 1_000_000 for w in v) and (not v or sum(v) > 0),
        "an array of numbers in 0..1000000, not all 0",
    )


def _redact_url(url: str | None) -> str | None:
    """``http://user:pw@host/x`` -> ``http://***@host/x``; other URLs unchanged. Split as the URL is used."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # unparsable (a bad [IPv6]): show nothing that could be a credential
        return "***" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _url_repr(url: str | None) -> str:
    return repr(_redact_url(url))

