"""KeyRing: a client key that matched once is recognised again without hashing; nothing else is remembered."""

from __future__ import annotations

from runestone.front import auth
from runestone.front.auth import KeyRing, key_id_of


def test_a_matched_key_is_not_hashed_again_and_wrong_keys_are_never_remembered(monkeypatch):
    hashed: list[bytes] = []
    digest = auth._digest

    def counting(key):
        hashed.append(key)
        return digest(key)

    ring = KeyRing(["sk-alpha", "sk-beta"], "sk-admin", open_mode=False)
    alpha, beta = key_id_of("sk-alpha"), key_id_of("sk-beta")
    monkeypatch.setattr(auth, "_digest", counting)
    assert ring.client(b"sk-alpha") == alpha
    assert ring.client(b"sk-alpha") == alpha
    assert hashed == [b"sk-alpha"]
    # Near misses of a remembered key are hashed and refused, every time.
    for wrong in (b"sk-alph", b"sk-alphaa", b"SK-ALPHA", b"sk-alpha ", b""):
        assert ring.client(wrong) is None
        assert ring.client(wrong) is None
    assert ring.client(b"sk-beta") == beta
    assert ring.client(b"sk-admin") == "admin"
    assert ring.client(b"sk-admin") == "admin"
    for n in range(1000):
        assert ring.client(b"sk-guess-%d" % n) is None
    assert len(ring._matched) == 3
    assert ring.is_admin(b"sk-admin") and not ring.is_admin(b"sk-alpha")
