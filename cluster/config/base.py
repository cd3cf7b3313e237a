"""What every config section shares: the error type, strict models, the
typo hint for an unknown key and the loopback test of an address."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """An operator config that cannot be applied; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def closest_key(word: str, keys) -> str | None:
    """The one of ``keys`` a typo ``word`` most likely meant (``max_replica``
    for ``max_replicas``), or None when none is close."""
    import difflib

    match = difflib.get_close_matches(str(word), list(keys), n=1, cutoff=0.75)
    return match[0] if match else None


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
