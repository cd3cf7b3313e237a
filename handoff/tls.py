"""TLS for the cluster's internal gRPC planes: the worker RPC plane
(``splitserve.handoff.rpc``) and the KV transfer plane's gRPC channels
(``splitserve.handoff.transfer``; torch_dist's control channel too).

Every replica serves one plane and dials the others, so one ``TLSConfig``
holds both halves: the certificate it serves (and presents as a client
under mutual TLS) and the CA bundle it verifies its peers with. Replicas
are dialed by IP address: either their certificates list those addresses,
or every certificate carries one name, given as ``server_name``.

Planes on plain asyncio streams (the router stream,
``splitserve.cluster.serve.router_stream``) take the same ``TLSConfig`` as
``ssl`` contexts (``server_ssl_context``, ``client_ssl_context``) with the
same rules: a server presents ``cert_chain`` and, under mutual TLS,
requires a client certificate signed by ``root_certs``; a client verifies
the server against ``root_certs`` (its address, or ``server_name``) and
presents ``cert_chain`` when it has one.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class TLSConfig:
    """PEM material of one process; ``None`` fields are not used."""

    cert_chain: bytes | None = None  # served; also presented to servers that ask for one
    private_key: bytes | None = None  # cert_chain's key
    root_certs: bytes | None = None  # CA bundle verifying servers (and clients under mutual TLS)
    server_name: str | None = None  # the name servers' certificates carry, if not their address
    # server: mutual TLS; a client without a certificate signed by root_certs is refused
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("TLSConfig: cert_chain and private_key go together")
        if self.require_client_cert and not self.root_certs:
            raise ValueError("TLSConfig: mutual TLS (require_client_cert) needs root_certs, the "
                             "CA that signed the clients' certificates")


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    if not tls.cert_chain or not tls.private_key:
        raise ValueError("a TLS server needs TLSConfig.cert_chain and private_key (PEM)")
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.root_certs if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.root_certs,
                                        private_key=tls.private_key,
                                        certificate_chain=tls.cert_chain)


def channel_options(tls: TLSConfig | None) -> list[tuple[str, object]]:
    """Channel options TLS adds: the expected server name, when set."""
    if tls is None or not tls.server_name:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """``server_credentials`` as an ``ssl`` context (asyncio servers)."""
    if not tls.cert_chain or not tls.private_key:
        raise ValueError("a TLS server needs TLSConfig.cert_chain and private_key (PEM)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls)
    if tls.require_client_cert:
        ctx.load_verify_locations(cadata=tls.root_certs.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """``channel_credentials`` as an ``ssl`` context (asyncio clients): the
    server's certificate and name are verified (``server_hostname``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.root_certs:
        ctx.load_verify_locations(cadata=tls.root_certs.decode())
    else:  # as gRPC without root certificates: the system's
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_chain:
        _load_chain(ctx, tls)
    return ctx


def server_hostname(tls: TLSConfig, host: str) -> str:
    """The name a client checks the server's certificate for: ``server_name``
    when set, else the address it dialed (``channel_options``' rule)."""
    return tls.server_name or host


def _load_chain(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    """``SSLContext.load_cert_chain`` reads only files: the PEM bytes go
    through a private temporary folder (mode 0700, files 0600) that is
    removed at once."""
    with tempfile.TemporaryDirectory(prefix="splitserve-tls-") as folder:
        paths = []
        for name, data in (("cert.pem", tls.cert_chain), ("key.pem", tls.private_key)):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        ctx.load_cert_chain(*paths)
