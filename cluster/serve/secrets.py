"""The cluster's secrets, kept out of Serve init arguments, deployment
configs and logs.

``splitserve deploy`` / ``serve`` settles the cluster token (the operator's,
from ``auth.cluster_token``, ``auth.cluster_token_file`` or
``$SPLITSERVE_CLUSTER_TOKEN``; else the one this cluster already keeps;
else a new random one) and writes it to Ray's internal key-value store (the
GCS) under the splitserve namespace. Worker replicas and the ingress read it
from there when they start. A redeploy keeps the cluster's token, so
running replicas and new ones agree. Only processes that can already run
code on the Ray cluster (its drivers and workers) can read the store.

Client API keys are resolved on the ingress node itself: ``auth.api_keys``
plus the lines of ``auth.api_keys_file`` plus ``$<auth.api_keys_env>``
(comma-separated), so a key can come from a mounted Secret or the
environment and never pass through the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from splitserve.cluster.config import AuthSpec, ClusterConfig, ConfigError

_NAMESPACE = "splitserve"
_TOKEN_KEY = b"cluster_token"
_API_KEYS_KEY = b"api_keys"


class SecretMissing(RuntimeError):
    """A replica started before ``splitserve deploy`` stored the cluster's secrets."""


def new_token() -> str:
    """A random cluster token (256 bits)."""
    return secrets.token_urlsafe(32)


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def publish(cfg: ClusterConfig) -> str:
    """Store the cluster's secrets for its replicas (needs a connected Ray
    driver): the cluster token this cluster uses from now on and the
    config's literal API keys. Returns their version: a digest that changes
    with them, given to replicas instead of the secrets, so Serve rebuilds
    the replicas when a secret changes."""
    kv = _kv()
    token = _token_for(cfg) or new_token()
    kv._internal_kv_put(_TOKEN_KEY, token.encode(), overwrite=True, namespace=_NAMESPACE)
    keys = json.dumps(cfg.auth.api_keys).encode()
    kv._internal_kv_put(_API_KEYS_KEY, keys, overwrite=True, namespace=_NAMESPACE)
    return _version(token, keys)


def version(cfg: ClusterConfig) -> str | None:
    """The version ``publish(cfg)`` would return, writing nothing (so
    ``splitserve deploy`` can say a secret changed); None when the cluster
    keeps no token yet and ``cfg`` names none."""
    token = _token_for(cfg)
    return None if token is None else _version(token, json.dumps(cfg.auth.api_keys).encode())


def _token_for(cfg: ClusterConfig) -> str | None:
    """``cfg``'s cluster token, else the one this cluster keeps."""
    token = cfg.cluster_token()
    if token is None:
        kept = _kv()._internal_kv_get(_TOKEN_KEY, namespace=_NAMESPACE)
        token = kept.decode() if kept else None
    return token


def _version(token: str, keys: bytes) -> str:
    return hashlib.blake2b(token.encode() + b"\0" + keys, digest_size=8,
                           person=b"splitserve-sec").hexdigest()


def token_version() -> str:
    """The version of the stored cluster token alone (needs a connected Ray
    driver, after ``publish``): what pool replicas are built with, since
    they read the token and never the API keys, so rotating a client key
    rolls the ingress and leaves every pool's replicas (and their KV caches
    and streams) alone."""
    return hashlib.blake2b(_read(_TOKEN_KEY), digest_size=8,
                           person=b"splitserve-tok").hexdigest()


def _read(key: bytes) -> bytes:
    value = _kv()._internal_kv_get(key, namespace=_NAMESPACE)
    if value is None:
        raise SecretMissing("the cluster's secret store holds no " + key.decode() + ": deploy "
                            "with `splitserve deploy` (or `splitserve serve`), which stores it")
    return value


def cluster_token() -> str:
    """The cluster token, as a replica reads it at start (inside Ray)."""
    return _read(_TOKEN_KEY).decode()


def api_keys(auth: AuthSpec) -> list[str]:
    """Every client key, as the ingress reads them at start (inside Ray):
    the config's (from the secret store), the lines of ``api_keys_file`` and
    the comma-separated values of ``$<api_keys_env>`` on this node."""
    stored = json.loads(_read(_API_KEYS_KEY))
    return resolve_api_keys(auth.model_copy(update={"api_keys": stored}))


def resolve_api_keys(auth: AuthSpec) -> list[str]:
    """Every client key of ``auth``, read on this node: the config's, the
    file's lines and the environment variable's comma-separated values."""
    keys = list(auth.api_keys)
    if auth.api_keys_file:
        path = Path(auth.api_keys_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"auth.api_keys_file {path}: {e.strerror}") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if auth.api_keys_env:
        value = os.environ.get(auth.api_keys_env)
        if value is None:
            raise ConfigError(f"auth.api_keys_env: ${auth.api_keys_env} is not set on this node")
        keys += [k.strip() for k in value.split(",") if k.strip()]
    if auth.has_api_keys() and not keys:
        raise ConfigError("auth: api_keys_file / api_keys_env are set but hold no key: refusing "
                          "to serve without client auth")
    return list(dict.fromkeys(keys))


def public_config(cfg: ClusterConfig) -> dict:
    """``cfg`` as the init argument of a Serve deployment: its secrets (the
    literal API keys and cluster token) left to the secret store."""
    data = cfg.model_dump()
    data["auth"] = {**data["auth"], "api_keys": [], "cluster_token": None}
    return data
