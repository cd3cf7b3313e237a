"""What every config section shares: the error type, strict models and the
loopback test of an address."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """An operator config that cannot be applied; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
