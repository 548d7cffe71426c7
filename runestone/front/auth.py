"""Client and admin keys: who is calling, checked in constant time.

Keys are never compared as strings. Each configured key is stored as its SHA-256 digest; a presented key
is hashed and looked up, and the match confirmed with ``hmac.compare_digest``. A dictionary lookup on a
digest reveals nothing an attacker can use (finding a key from its digest is preimage search), so the
check costs one hash whatever the number of keys. A key is known elsewhere only by its *key id*
(``key_`` + 12 hex digits of the digest), which is what logs, the usage ledger and dumps show.

A client key that matched is remembered (the presented bytes and its key id), so that the next request
with it costs a dictionary lookup instead of a hash. Only keys that matched are kept, so the memory is
bounded by the configured keys and a stream of wrong keys pays the hash every time as before. The lookup
compares the presented bytes with a remembered key only when their salted ``hash()`` values (SipHash under
a per-process random key) are equal, so how long a wrong key takes depends on nothing an attacker can
relate to a configured key's bytes, as with the digest lookup. A managed key's secret that matched is
remembered with its digest only (at most 10,000 of them): the key is looked up every time, since it may be
revoked or expire, but the hash is made once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

__all__ = ["KeyRing", "key_id_of", "is_loopback"]


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def key_id_of(key: str | bytes) -> str:
    return "key_" + _digest(key).hex()[:12]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyRing:
    """The configured client keys and the admin key. ``open_mode``: no client keys, loopback only."""

    def __init__(self, api_keys, admin_key: str | None, *, open_mode: bool) -> None:
        self._clients = {_digest(k): key_id_of(k) for k in api_keys if k}
        self._admin = _digest(admin_key) if admin_key else None
        #: Presented keys that matched, and their key ids (see the module's docstring).
        self._matched: dict[str | bytes, str] = {}
        self.open_mode = open_mode
        self.has_admin = self._admin is not None
        #: Managed keys (runestone.governance): digest -> key id of an active key, or None.
        self.managed = None
        #: Presented secrets that matched a managed key, and their digests (bounded): the lookup itself is
        #: made every time (a managed key may be revoked or expire), only the hashing is saved.
        self._managed_digests: dict[bytes, bytes] = {}

    @staticmethod
    def bearer(header: bytes | None) -> bytes | None:
        if not header:
            return None
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        return token or None

    def client(self, token: bytes | None) -> str | None:
        """The key id of a valid client key (the admin key counts as one), else None."""
        if token is None:
            return None
        kid = self._matched.get(token)
        if kid is not None:
            return kid
        d = self._managed_digests.get(token)
        if d is not None:
            return self.managed(d)
        d = _digest(token)
        kid = self._clients.get(d)
        if kid is None and self._admin is not None and hmac.compare_digest(self._admin, d):
            kid = "admin"
        if kid is not None:
            # Static keys only: a managed key may be revoked or expire, so it is looked up every time.
            self._matched[token] = kid
            return kid
        if self.managed is not None:
            kid = self.managed(d)
            if kid is not None:
                if len(self._managed_digests) >= 10_000:
                    self._managed_digests.clear()
                self._managed_digests[token] = d
            return kid
        return None

    def is_admin(self, token: bytes | None) -> bool:
        if self._admin is None or token is None:
            return False
        return hmac.compare_digest(self._admin, _digest(token))
