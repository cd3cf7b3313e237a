"""The operator's cluster description (one YAML file), validated.

Every user-facing knob lives here with its description; an invalid file is
refused with the key path and the problem, and nothing is applied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """An operator config that cannot be applied; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: str = Field("default", description="Served model name clients ask for.")
    path: str | None = Field(None, description="Local Hugging Face checkpoint directory; "
                             "None serves the embedded default model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV block (power of two).")
    max_model_len: int | None = Field(None, ge=16, description="Context cap; None: the model's.")
    num_blocks: int | None = Field(None, ge=16, description="KV blocks per replica; None: sized "
                                   "from kv_cache_memory_gb.")
    kv_cache_memory_gb: float = Field(0.25, gt=0)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=16)
    device: str = Field("auto", description="auto: cuda when the replica has a GPU, else cpu.")

    @model_validator(mode="after")
    def _power_of_two(self) -> "ModelSpec":
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self


class AutoscalingSpec(_Strict):
    bottleneck: Literal["compute", "memory", "network"] = Field(
        ..., description="What limits this pool: prefill is compute-bound, decode memory-bound; "
        "network scales on hand-off bandwidth.")
    target_ttft_s: float = Field(1.0, gt=0, description="compute: predicted queueing delay target.")
    target_busy_fraction: float = Field(0.8, gt=0, le=1)
    target_kv_usage: float = Field(0.75, gt=0, le=1, description="memory: KV block usage target.")
    target_tpot_s: float | None = Field(None, gt=0, description="memory: time per output token.")
    target_link_utilization: float = Field(0.7, gt=0, le=1, description="network: share of link.")
    link_bytes_per_s: float = Field(1.25e9, gt=0, description="network: configured link capacity.")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    cooldown_s: float = Field(10.0, ge=0)
    look_back_s: float = Field(10.0, gt=0)


class PoolSpec(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    node_type: str | None = Field(None, description="Custom resource the replica requests "
                                  "(e.g. 'prefill_node'), so it lands on that node type.")
    resources: dict[str, float] = Field(default_factory=dict)
    autoscaling: AutoscalingSpec | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "PoolSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(f"initial_replicas ({init}) outside [min_replicas, max_replicas]")
        return self

    def ray_actor_options(self) -> dict[str, Any]:
        res = dict(self.resources)
        if self.node_type:
            res[self.node_type] = res.get(self.node_type, 0.01) or 0.01
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if res:
            opts["resources"] = res
        return opts


class ServedModel(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    prefill: PoolSpec = Field(default_factory=lambda: PoolSpec(
        autoscaling=AutoscalingSpec(bottleneck="compute")))
    decode: PoolSpec = Field(default_factory=lambda: PoolSpec(
        autoscaling=AutoscalingSpec(bottleneck="memory")))


class TransferSpec(_Strict):
    transport: Literal["grpc", "torch_dist"] = Field(
        "grpc", description="grpc: any network; torch_dist: NCCL between GPUs (gloo on CPU).")
    layer_group_size: int = Field(0, ge=0, description="Layers per transfer chunk; 0: all at once.")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one chunk's transfer.")
    prefill_timeout_s: float = Field(120.0, gt=0, description="Deadline of a whole remote prefill.")
    lease_s: float = Field(30.0, gt=0, description="How long a decode reservation waits for KV.")
    on_prefill_failure: Literal["local", "error"] = Field(
        "local", description="local: prefill on the decode replica; error: fail the request.")
    chunk_bytes: int = Field(4 << 20, ge=1 << 16)


class RouterSpec(_Strict):
    policy: Literal["cost", "prefix_aware", "least_loaded", "round_robin"] = "cost"
    max_queue_per_model: int = Field(256, ge=1)
    stats_period_s: float = Field(0.25, gt=0)
    stats_ttl_s: float = Field(5.0, gt=0)
    network_bytes_per_s: float = Field(1.25e9, gt=0)
    local_prefill_max_tokens: int = Field(512, ge=0)
    max_retries: int = Field(2, ge=0, description="Other replica pairs tried after a refusal.")


class AuthSpec(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="Client keys (HTTP Bearer, gRPC "
                                "metadata); empty: no client auth.")
    cluster_token: str | None = Field(None, description="Secret the workers share; None: "
                                      "$SPLITSERVE_CLUSTER_TOKEN or a random one per deploy.")


class EndpointSpec(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None


class SLOSpec(_Strict):
    ttft_s: float = Field(1.0, gt=0)
    tpot_s: float = Field(0.2, gt=0)


class ClusterConfig(_Strict):
    name: str = "splitserve"
    models: list[ServedModel] = Field(default_factory=lambda: [ServedModel()], min_length=1)
    router: RouterSpec = Field(default_factory=RouterSpec)
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    endpoints: EndpointSpec = Field(default_factory=EndpointSpec)
    slo: SLOSpec = Field(default_factory=SLOSpec)

    @model_validator(mode="after")
    def _unique_names(self) -> "ClusterConfig":
        names = [m.model.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        return self

    def cluster_token(self) -> str:
        return self.auth.cluster_token or os.environ.get("SPLITSERVE_CLUSTER_TOKEN") or "splitserve-dev"


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> ClusterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format(e)}") from None


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    return parse_config(data, str(p))
