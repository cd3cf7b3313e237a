"""What every config section shares: the error type, strict models, the
typo hint for an unknown key and the tests of an address."""

from __future__ import annotations

import re
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """An operator config that cannot be applied; the message names the key."""


class _Strict(BaseModel):
    # NaN passes no bound check honestly (it fails ``le`` with a misleading
    # message and slips through fields without bounds), and .inf in a rate
    # or a capacity is no setting anyone means: every number must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info: ValidationInfo):
        # pydantic's lax mode reads YAML's true/yes/on as 1 for an int or a
        # float field: ``drain_s: yes`` would drain for one second
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"true/false where a number goes (got {str(value).lower()})")
        return value


def _is_number(annotation) -> bool:
    """int, float, or either of them or None."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = set(typing.get_args(annotation)) - {type(None)}
        return bool(args) and args <= {int, float}
    return False


def closest_key(word: str, keys) -> str | None:
    """The one of ``keys`` a typo ``word`` most likely meant (``max_replica``
    for ``max_replicas``), or None when none is close."""
    import difflib

    match = difflib.get_close_matches(str(word), list(keys), n=1, cutoff=0.75)
    return match[0] if match else None


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be an address to listen on (an IP address, IPv6
    in brackets or not, or a DNS host name), or None."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    if _HOST_NAME.match(host):
        return None
    return (f"{host!r} is not an IP address or host name (e.g. 127.0.0.1, 0.0.0.0, "
            "node-1.internal); ports go in their own keys")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
