"""The operator's cluster description (one YAML file), validated.

Every user-facing knob lives here with its description; an invalid file is
refused with the key path and the problem, and nothing is applied.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from splitserve.engine.roles import Role
from splitserve.router.config import ModelFacts, RouterConfig

if TYPE_CHECKING:
    from splitserve.handoff.tls import TLSConfig


class ConfigError(ValueError):
    """An operator config that cannot be applied; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: str = Field("default", description="Served model name clients ask for.")
    path: str | None = Field(None, description="Checkpoint: a directory (local, or shared "
                             "storage every node mounts) or a Hugging Face repo id (org/name), "
                             "resolved through each node's Hugging Face cache; None serves the "
                             "embedded default model.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hugging Face repo "
                                 "id; None: main.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto: the checkpoint's.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="KV cache element type; fp8 halves KV memory and hand-off bytes.")
    weight_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="Projection weights: auto keeps the checkpoint's (fp8 checkpoints, "
        "HF fp8 or compressed-tensors float8, stay fp8); fp8 quantizes an unquantized "
        "checkpoint's at load, one scale per output channel (half of bf16's weight bytes).")
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV block (power of two).")
    max_model_len: int | None = Field(None, ge=16, description="Context cap; None: the model's.")
    num_blocks: int | None = Field(None, ge=16, description="KV blocks per replica; None: sized "
                                   "from kv_cache_memory_gb.")
    kv_cache_memory_gb: float = Field(0.25, gt=0, description="KV cache size per replica when "
                                      "num_blocks is not given.")
    max_num_seqs: int = Field(32, ge=1, description="Sequences one replica runs at once.")
    max_num_batched_tokens: int = Field(1024, ge=16, description="Token budget of one engine "
                                        "step (prompt chunks plus decode tokens).")
    device: str = Field("auto", description="auto: cuda when the replica has a GPU, else cpu.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV of identical prompt "
                                        "prefixes across requests.")
    chat_template: str | None = Field(None, description="Chat template for chat requests: a "
                                      "Jinja file on the ingress nodes or the template text; "
                                      "None: the checkpoint's.")
    tool_call_parser: Literal["auto", "hermes", "mistral", "llama3_json"] = Field(
        "auto", description="How the model writes tool calls (chat requests with tools); "
        "auto: detected from its chat template.")
    reasoning_parser: Literal["none", "auto", "qwen3", "deepseek_r1"] = Field(
        "auto", description="How the model writes its reasoning (chat and Responses answers "
        "carry it apart from the content): qwen3 <think>...</think>, deepseek_r1 (the template "
        "opens <think>, the output closes it); auto: detected from its chat template (none "
        "when it mentions no think tags); none: the output is all content.")

    @model_validator(mode="after")
    def _power_of_two(self) -> "ModelSpec":
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self


class AutoscalingSpec(_Strict):
    bottleneck: Literal["compute", "memory", "network"] = Field(
        ..., description="What limits this pool: prefill is compute-bound, decode memory-bound; "
        "network scales on hand-off bandwidth (and makes the router prefer local prefill).")
    target_ttft_s: float = Field(1.0, gt=0, description="compute: target of the predicted "
                                 "queueing delay (pending prompt tokens / measured prefill "
                                 "tokens per second).")
    target_busy_fraction: float = Field(0.8, gt=0, le=1, description="compute: target share of "
                                        "wall time the engine loop is busy (and GPU SM "
                                        "utilization, where NVML reports it).")
    target_kv_usage: float = Field(0.75, gt=0, le=1, description="memory: target share of KV "
                                   "blocks in use.")
    target_seq_fraction: float = Field(0.75, gt=0, le=1, description="memory: target share of "
                                       "max_num_seqs running.")
    target_tpot_s: float | None = Field(None, gt=0, description="memory: target time per "
                                        "output token (decode step time); None: not used.")
    target_link_utilization: float = Field(0.7, gt=0, le=1, description="network: target share "
                                           "of link_bytes_per_s used by KV hand-offs.")
    link_bytes_per_s: float = Field(1.25e9, gt=0, description="network: link capacity of one "
                                    "replica's node, bytes per second.")
    upscale_delay_s: float = Field(5.0, ge=0, description="How long the pool must want more "
                                   "replicas, without interruption, before it scales up.")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long the pool must want fewer "
                                     "replicas, without interruption, before it scales down.")
    cooldown_s: float = Field(10.0, ge=0, description="Minimum time between two changes of the "
                              "replica count.")
    look_back_s: float = Field(10.0, gt=0, description="Window of replica metrics each "
                               "decision averages over.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas push their "
                                      "metrics to the Serve controller.")

    @model_validator(mode="after")
    def _window(self) -> "AutoscalingSpec":
        if self.look_back_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_s ({self.look_back_s}) must exceed metrics_interval_s "
                             f"({self.metrics_interval_s}) so each window holds a metrics push")
        return self


class PoolSpec(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas; at least 1 when the pool "
                              "autoscales (its metrics come from running replicas).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at first deploy; "
                                         "None: min_replicas. Ignored when re-applied to a "
                                         "running pool.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves.")
    node_type: str | None = Field(None, description="Custom resource the replica requests "
                                  "(e.g. 'prefill_node'), so it lands on that node type.")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra custom Ray "
                                        "resources each replica requests.")
    graceful_shutdown_timeout_s: float = Field(30.0, gt=0, description="How long a replica being "
                                               "removed may drain its in-flight requests.")
    autoscaling: AutoscalingSpec | None = Field(None, description="Scale on the pool's "
                                                "bottleneck; None: a fixed size.")

    @model_validator(mode="after")
    def _bounds(self) -> "PoolSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(f"initial_replicas ({init}) outside [min_replicas, max_replicas]")
        if self.autoscaling is not None and self.min_replicas < 1:
            raise ValueError("min_replicas must be at least 1 when autoscaling is set: the "
                             "policy scales on metrics that running replicas report")
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
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model and its engine.")
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="disaggregated: separate prefill and decode pools; "
        "colocated: one pool (the decode pool's spec) does both.")
    prefill: PoolSpec = Field(default_factory=lambda: PoolSpec(
        autoscaling=AutoscalingSpec(bottleneck="compute")), description="The prefill pool "
        "(unused when colocated); by default 1 replica with compute autoscaling.")
    decode: PoolSpec = Field(default_factory=lambda: PoolSpec(
        autoscaling=AutoscalingSpec(bottleneck="memory")), description="The decode pool; by "
        "default 1 replica with memory autoscaling.")

    def roles(self) -> tuple[Role, ...]:
        """The roles of this model's pools, one Serve application each."""
        return (Role.COLOCATED,) if self.mode == "colocated" else (Role.PREFILL, Role.DECODE)

    def pool(self, role: Role) -> PoolSpec:
        """The spec of the pool playing ``role`` (a colocated pool is the decode spec)."""
        return self.prefill if role is Role.PREFILL else self.decode


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
                                "(torch_dist: its control channel); None: plaintext, "
                                "authenticated by the cluster token only.")


class DeadlineSpec(_Strict):
    """The ``deadlines`` section: how long the ingress waits on a decode
    replica's Generate stream. Past any of them the stream is cancelled
    (the workers abort the request and free its KV on both sides) and the
    client gets 504 / DEADLINE_EXCEEDED. The Prefill call's own deadline is
    ``transfer.prefill_timeout_s``."""

    first_output_s: float = Field(300.0, gt=0, description="Longest wait for a request's first "
                                  "token from its decode replica: queueing, remote prefill and "
                                  "KV hand-off included.")
    inter_token_s: float = Field(60.0, gt=0, description="Longest silence between two outputs "
                                 "of a decode stream.")
    per_token_s: float = Field(1.0, gt=0, description="A request's overall deadline is "
                                "first_output_s + per_token_s x its output tokens (max_tokens, "
                                "else the context left), at most max_request_s; resumes on "
                                "another replica share it.")
    max_request_s: float = Field(3600.0, gt=0, description="Cap of a request's overall "
                                 "deadline.")

    def overall_s(self, max_output_tokens: int) -> float:
        """The overall deadline of a request that may produce this many tokens."""
        return min(self.max_request_s, self.first_output_s + self.per_token_s * max_output_tokens)


# RouterConfig's defaults: the router section repeats none of them
_ROUTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterConfig)
                    if f.default is not dataclasses.MISSING}


class RouterSpec(_Strict):
    """The ``router`` section: the knobs of ``splitserve.router.config.RouterConfig``
    an operator sets, under its names and with its defaults, plus three that
    the replicas and the ingress read (``NOT_ROUTER_FIELDS``)."""

    NOT_ROUTER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"stats_period_s", "max_retries", "routers"})

    policy: Literal["cost", "prefix_aware", "least_loaded", "round_robin"] = Field(
        _ROUTER_DEFAULTS["policy"], description="Placement policy of (prefill, decode) pairs.")
    routers: int = Field(2, ge=1, le=16, description="Router actors. Each model is placed by "
                         "one of them at a time; the others hold the same replica stats and "
                         "prefixes and take over at once if it dies. More routers spread the "
                         "placements of several models.")
    max_queue_per_model: int = Field(_ROUTER_DEFAULTS["max_queue_per_model"], ge=1,
                                     description="Requests holding a slot per model (placed, or "
                                     "waiting in the router's queue) before new ones are refused "
                                     "(HTTP 429).")
    stats_period_s: float = Field(0.25, gt=0, description="How often replicas push their load "
                                  "to the router.")
    stats_ttl_s: float = Field(_ROUTER_DEFAULTS["stats_ttl_s"], gt=0, description="Stats older "
                               "than this make a replica ineligible; 3x this forgets it.")
    network_bytes_per_s: float = Field(_ROUTER_DEFAULTS["network_bytes_per_s"], gt=0,
                                       description="Bandwidth the cost model assumes for KV "
                                       "hand-offs.")
    local_prefill_max_tokens: int = Field(_ROUTER_DEFAULTS["local_prefill_max_tokens"], ge=0,
                                          description="Prompts up to this many uncached tokens "
                                          "may prefill on the decode replica.")
    max_retries: int = Field(2, ge=0, description="Other replica pairs tried after a refusal.")
    max_queue_delay_s: float = Field(_ROUTER_DEFAULTS["max_queue_delay_s"], ge=0,
                                     description="Longest a new request waits for a replica that "
                                     "can take it (in the router's queue, plus the predicted "
                                     "prefill queue) before it is refused with HTTP 429 and "
                                     "Retry-After; 0: until its client gives up.")
    no_replica_grace_s: float = Field(_ROUTER_DEFAULTS["no_replica_grace_s"], ge=0,
                                      description="Requests of a model with no live decode "
                                      "replica wait this long (a replica restarting) before they "
                                      "are refused with HTTP 503.")
    lease_ttl_s: float = Field(_ROUTER_DEFAULTS["lease_ttl_s"], gt=0,
                               description="An ingress silent this long is taken for dead: "
                               "its admission slots are freed. Keep it well above "
                               "stats_period_s (ingresses renew every period).")
    expected_output_tokens: int = Field(_ROUTER_DEFAULTS["expected_output_tokens"], ge=0,
                                        description="Output tokens a request is expected to "
                                        "produce, for its KV room, until the model's own output "
                                        "lengths are learned; 0: hold room for max_tokens.")
    output_tokens_quantile: float = Field(_ROUTER_DEFAULTS["output_tokens_quantile"], gt=0, le=1,
                                          description="Quantile of the model's recent output "
                                          "lengths held as KV room (preemption covers longer "
                                          "outputs).")

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "RouterSpec":
        if self.lease_ttl_s < 4 * self.stats_period_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must be at least 4x "
                             f"stats_period_s ({self.stats_period_s}): ingresses renew their "
                             "slots once a period")
        return self

    def router_config(self, models: Mapping[str, ModelFacts]) -> RouterConfig:
        """The router's config for serving ``models`` (name -> its facts)."""
        return RouterConfig(models=dict(models),
                            **self.model_dump(exclude=set(self.NOT_ROUTER_FIELDS)))


class AuthSpec(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="Client keys (HTTP Bearer, gRPC "
                                "metadata), added to those of api_keys_file and api_keys_env; "
                                "none at all: no client auth (loopback only, see "
                                "endpoints.allow_unauthenticated).")
    api_keys_file: str | None = Field(None, description="File on the ingress nodes with one "
                                      "client key per line (# starts a comment), e.g. a mounted "
                                      "Kubernetes Secret.")
    api_keys_env: str | None = Field(None, description="Environment variable of the ingress "
                                     "nodes holding comma-separated client keys.")
    cluster_token: str | None = Field(None, description="Secret the internal planes (worker RPC, "
                                      "KV transfer) share. None: cluster_token_file, else "
                                      "$SPLITSERVE_CLUSTER_TOKEN, else a random token made at the "
                                      "first deploy and kept in the cluster's secret store.")
    cluster_token_file: str | None = Field(None, description="File holding the cluster token, "
                                           "read where `splitserve deploy` runs.")

    @model_validator(mode="after")
    def _no_blank_secrets(self) -> "AuthSpec":
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("api_keys: a key is empty")
        if self.cluster_token is not None and not self.cluster_token.strip():
            raise ValueError("cluster_token: empty (leave it unset for a random one)")
        return self

    def has_api_keys(self) -> bool:
        """Whether client auth is configured (from any source)."""
        return bool(self.api_keys or self.api_keys_file or self.api_keys_env)


class EndpointSpec(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP and gRPC APIs listen on.")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI HTTP API port.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC API port.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body.")
    grpc_tls_cert: str | None = Field(None, description="PEM certificate file for gRPC TLS.")
    grpc_tls_key: str | None = Field(None, description="PEM key file for gRPC TLS.")
    http_tls_cert: str | None = Field(None, description="PEM certificate file for HTTPS on "
                                      "http_port.")
    http_tls_key: str | None = Field(None, description="PEM key file for HTTPS on http_port.")
    allow_unauthenticated: bool = Field(False, description="Serve on a non-loopback host without "
                                        "API keys. Off: such a config is refused, since anyone "
                                        "who reaches the port gets free inference.")

    @model_validator(mode="after")
    def _tls_pairs(self) -> "EndpointSpec":
        for proto in ("grpc", "http"):
            if (getattr(self, f"{proto}_tls_cert") is None) != (getattr(self, f"{proto}_tls_key") is None):
                raise ValueError(f"{proto}_tls_cert and {proto}_tls_key go together (PEM files)")
        return self

    def is_loopback(self) -> bool:
        """Whether the APIs listen on this machine only."""
        return is_loopback_host(self.host)


class ObservabilitySpec(_Strict):
    unauthenticated_routes: list[Literal["health", "metrics"]] = Field(
        default_factory=list, description="Routes answered without an API key: health = "
        "/health, /ready, /version and the gRPC health service (for Kubernetes probes); "
        "metrics = /metrics (for a Prometheus that holds no key). Default: every route "
        "needs the key when keys are configured.")
    vllm_metric_names: bool = Field(False, description="/metrics also exports vLLM's metric "
                                    "names (vllm:time_to_first_token_seconds, ...) so rules and "
                                    "gateways written for vLLM work; see docs/operators.md.")


class SLOSpec(_Strict):
    ttft_s: float = Field(1.0, gt=0, description="Time-to-first-token objective (reports and "
                          "benchmarks).")
    tpot_s: float = Field(0.2, gt=0, description="Time-per-output-token objective.")


class ClusterConfig(_Strict):
    name: str = Field("splitserve", description="Cluster name, shown by `splitserve status`.")
    models: list[ServedModel] = Field(default_factory=lambda: [ServedModel()], min_length=1,
                                      description="The models served, each with its pools.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="Request placement.")
    transfer: TransferSpec = Field(default_factory=TransferSpec, description="KV hand-off.")
    deadlines: DeadlineSpec = Field(default_factory=DeadlineSpec, description="Deadlines of "
                                    "the streams between ingress and decode replicas.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="Client and worker secrets.")
    endpoints: EndpointSpec = Field(default_factory=EndpointSpec, description="Client APIs.")
    slo: SLOSpec = Field(default_factory=SLOSpec, description="Latency objectives.")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec,
                                             description="Metrics and probe endpoints.")

    @model_validator(mode="after")
    def _unique_names(self) -> "ClusterConfig":
        names = [m.model.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        return self

    def exposure_problem(self) -> str | None:
        """Why serving this config would open a door (a non-loopback API
        without client keys, not explicitly allowed), or None."""
        ep = self.endpoints
        if ep.is_loopback() or self.auth.has_api_keys() or ep.allow_unauthenticated:
            return None
        return (f"endpoints.host {ep.host!r} is reachable from other machines but no API key is "
                "configured: set auth.api_keys, auth.api_keys_file or auth.api_keys_env, or "
                "endpoints.allow_unauthenticated: true to serve without client auth")

    def cluster_token(self) -> str | None:
        """The operator's cluster token (config, file or environment), or None
        when the cluster keeps its own random one (cluster/serve/secrets.py)."""
        a = self.auth
        if a.cluster_token:
            return a.cluster_token
        if a.cluster_token_file:
            try:
                token = Path(a.cluster_token_file).expanduser().read_text().strip()
            except OSError as e:
                raise ConfigError(f"auth.cluster_token_file {a.cluster_token_file}: "
                                  f"{e.strerror}") from None
            if not token:
                raise ConfigError(f"auth.cluster_token_file {a.cluster_token_file}: empty")
            return token
        return os.environ.get("SPLITSERVE_CLUSTER_TOKEN") or None


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: addresses no other machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format(e)}") from None
    problem = cfg.exposure_problem()
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    return cfg


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


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(
            isinstance(v, dict) and "model" in v for v in value):
        for v in value:  # served models are keyed by name, not position
            _flatten(v, f"{prefix}[{v['model']['name']}]", out)
    else:
        out[prefix] = value


def config_changes(old: ClusterConfig | None, new: ClusterConfig) -> list[str]:
    """What applying ``new`` over ``old`` changes, one line per key, e.g.
    ``models[tiny].decode.max_replicas: 2 -> 4``; secrets are not shown."""
    if old is None:
        return ["(new cluster)"]
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old.model_dump(), "", a)
    _flatten(new.model_dump(), "", b)
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key.startswith("auth."):
            lines.append(f"{key}: changed")
        elif key not in a:
            lines.append(f"{key}: added {b[key]!r}")
        elif key not in b:
            lines.append(f"{key}: removed")
        else:
            lines.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return lines


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    for name in ("ModelSpec", "PoolSpec", "AutoscalingSpec", "ServedModel", "RouterSpec",
                 "TransferSpec", "TLSSpec", "DeadlineSpec", "AuthSpec", "EndpointSpec", "SLOSpec"):
        text = text.replace(f"splitserve.cluster.config.{name}", name)
    return text.replace("NoneType", "None").replace("|", "or").replace("Literal", "one of ")


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return f"{len(value)} entry with its defaults"
        return "(its defaults)" if isinstance(value, BaseModel) else repr(value)
    return repr(field.default)


def config_reference() -> str:
    """The Markdown reference of every operator config key, from the Field
    descriptions (docs/operators.md embeds it; a test keeps them in sync)."""
    sections = [("(top level)", ClusterConfig), ("models[]", ServedModel),
                ("models[].model", ModelSpec), ("models[].prefill / models[].decode", PoolSpec),
                ("models[].prefill.autoscaling / models[].decode.autoscaling", AutoscalingSpec), ("router", RouterSpec),
                ("transfer", TransferSpec), ("transfer.tls", TLSSpec), ("deadlines", DeadlineSpec),
                ("auth", AuthSpec), ("endpoints", EndpointSpec), ("slo", SLOSpec),
                ("observability", ObservabilitySpec)]
    out = []
    for title, model in sections:
        out += [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            ty = _type_name(f.annotation).replace("|", "\\|")
            out.append(f"| `{name}` | {ty} | `{_default_text(f)}` | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
