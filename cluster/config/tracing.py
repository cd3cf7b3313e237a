"""The ``observability.tracing`` section: where the cluster sends its
OpenTelemetry spans (OTLP over gRPC), and how much of the traffic it traces."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from .base import _Strict


class TracingSpec(_Strict):
    endpoint: str | None = Field(None, description="OTLP/gRPC collector, e.g. "
                                 "http://otel-collector:4317 (http:// plaintext, https:// TLS). "
                                 "None: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                                 "$OTEL_EXPORTER_OTLP_ENDPOINT of each node; neither set: no "
                                 "tracing. Needs the `tracing` extra (pip install "
                                 "'splitserve[tracing]').")
    service_name: str = Field("splitserve", min_length=1, description="service.name of every "
                              "span; each process adds its role (splitserve.role: ingress, "
                              "router, prefill, decode, colocated).")
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests traced, "
                                "decided at the ingress; a client's traceparent decides for its "
                                "own requests (its sampled flag).")
    insecure: bool | None = Field(None, description="Plaintext gRPC to the collector. None: "
                                  "by the endpoint's scheme (http:// plaintext, https:// TLS), "
                                  "else $OTEL_EXPORTER_OTLP_INSECURE.")
    ca_file: str | None = Field(None, description="PEM bundle that verifies the collector's "
                                "certificate (TLS); None: the system's roots.")
    client_cert_file: str | None = Field(None, description="PEM client certificate for mutual "
                                         "TLS with the collector (with client_key_file).")
    client_key_file: str | None = Field(None, description="PEM key of client_cert_file.")
    headers: dict[str, str] = Field(default_factory=dict, description="gRPC metadata sent with "
                                    "every export. Visible in the deployed config: put "
                                    "credentials in headers_env instead.")
    headers_env: str | None = Field(None, description="Environment variable of each node "
                                    "holding more headers as key=value,key2=value2 (e.g. "
                                    "authorization=Bearer%20<token>, values URL-encoded), read "
                                    "where spans are exported.")
    schedule_delay_ms: int = Field(500, ge=1, le=60_000, description="Longest time an ended "
                                   "span waits before its batch is exported; replicas also "
                                   "flush when they stop.")
    timeout_s: float = Field(10.0, gt=0, description="Deadline of one export call.")

    @field_validator("headers")
    @classmethod
    def _lowercase_keys(cls, headers: dict[str, str]) -> dict[str, str]:
        # gRPC metadata keys are lowercase; an uppercase one fails every export
        if any(k != k.lower() or not k for k in headers):
            raise ValueError("header names must be non-empty and lowercase (gRPC metadata)")
        return headers

    @model_validator(mode="after")
    def _client_pair(self) -> "TracingSpec":
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together (PEM files)")
        return self
