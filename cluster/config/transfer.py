"""The ``transfer`` section: how KV moves between replicas, and its TLS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from .base import ConfigError, _Strict, host_problem

if TYPE_CHECKING:
    from splitserve.handoff.tls import TLSConfig


class TLSSpec(_Strict):
    """TLS of the internal planes: PEM files present on every node."""

    cert: str = Field(description="PEM certificate chain file each replica serves (and, with "
                      "mutual, presents as a client); it must name the replicas' addresses, or "
                      "server_name. This and the other files are read on every node.")
    key: str = Field(description="PEM private key file of cert.")
    ca: str = Field(description="PEM CA bundle file that signed the replicas' certificates; peers "
                    "are verified against it.")
    mutual: bool = Field(False, description="Also require clients (the ingress, other "
                         "replicas) to present a certificate signed by ca.")
    server_name: str | None = Field(None, description="The name every replica's certificate "
                                    "carries, when they do not list the replicas' addresses.")

    def load(self) -> "TLSConfig":
        """The PEM material as a ``splitserve.handoff.tls.TLSConfig``, read
        on this node; ConfigError naming the key of a file it cannot read."""
        from splitserve.handoff.tls import TLSConfig

        def read(key: str) -> bytes:
            path = Path(getattr(self, key)).expanduser()
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"transfer.tls.{key} {path}: {e.strerror}") from None
            if b"-----BEGIN " not in data:
                raise ConfigError(f"transfer.tls.{key} {path}: not a PEM file")
            return data

        return TLSConfig(cert_chain=read("cert"), private_key=read("key"), root_certs=read("ca"),
                         server_name=self.server_name, require_client_cert=self.mutual)


class TransferSpec(_Strict):
    transport: Literal["grpc", "torch_dist"] = Field(
        "grpc", description="grpc: any network; torch_dist: NCCL between GPUs (gloo on CPU).")
    layer_group_size: int = Field(0, ge=0, description="Layers per transfer chunk; 0: all at once.")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one chunk's transfer.")
    prefill_timeout_s: float = Field(120.0, gt=0, description="Deadline of a whole remote prefill.")
    lease_s: float = Field(30.0, gt=0, description="How long a decode reservation waits for KV.")
    on_prefill_failure: Literal["local", "error"] = Field(
        "local", description="local: prefill on the decode replica; error: fail the request.")
    bind_host: str | None = Field(
        None, description="Address worker RPCs and KV receivers bind and advertise; None: "
        "$SPLITSERVE_BIND_HOST, else the node's Ray address.")
    chunk_bytes: int = Field(1 << 20, ge=1 << 16, description="Largest message of a KV "
                             "transfer, bytes.")
    tls: TLSSpec | None = Field(None, description="TLS for the worker RPC and KV transfer planes "
                                "(torch_dist: its control channel) and the router streams; "
                                "None: plaintext, authenticated by the cluster token (the "
                                "routers' tokens) only.")

    @field_validator("bind_host")
    @classmethod
    def _an_address(cls, host: str | None) -> str | None:
        problem = None if host is None else host_problem(host)
        if problem:
            raise ValueError(problem)
        return host
