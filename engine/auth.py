"""The one check of a presented secret: client API keys and the cluster token.

Callers hold secrets as ``str`` or as ``bytes`` (already encoded), and
transports hand over what a peer sent in either form; both are compared as
UTF-8 bytes, so a non-ASCII secret works and a str never fails against the
same secret as bytes. The comparison takes the same time wherever the first
difference is, and checks every accepted secret (no early exit), so the time
taken does not tell a caller which secret came close. A missing or empty
secret matches nothing, on either side.
"""

from __future__ import annotations

import hmac


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def secret_matches(given: str | bytes | None, *accepted: str | bytes) -> bool:
    """True when ``given`` equals one of ``accepted``."""
    if not given:
        return False
    got = _as_bytes(given)
    ok = False
    for secret in accepted:
        ok |= hmac.compare_digest(got, _as_bytes(secret))
    return ok
