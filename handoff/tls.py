"""TLS for the cluster's internal gRPC planes: the worker RPC plane
(``splitserve.handoff.rpc``) and the KV transfer plane's gRPC channels
(``splitserve.handoff.transfer``; torch_dist's control channel too).

Every replica serves one plane and dials the others, so one ``TLSConfig``
holds both halves: the certificate it serves (and presents as a client
under mutual TLS) and the CA bundle it verifies its peers with. Replicas
are dialed by IP address: either their certificates list those addresses,
or every certificate carries one name, given as ``server_name``.
"""

from __future__ import annotations

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
