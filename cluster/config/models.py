"""The ``models[]`` entries: a served model, its engine settings and its two
pools with their autoscaling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from splitserve.engine.roles import Role

from .adapters import AdapterSpec
from .base import _Strict
from .speculative import SpeculativeSpec


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
    state_checkpoints: int | None = Field(None, ge=0, description="Hybrid models: recurrent-state "
                                          "checkpoints a replica keeps for prefix-cache hits (each "
                                          "one sequence's states, out of kv_cache_memory_gb); "
                                          "None: max_num_seqs; 0: no prefix caching. Ignored "
                                          "for other models.")
    enforce_eager: bool = Field(False, description="On GPUs, run decode steps eagerly instead "
                                "of replaying captured CUDA graphs (less memory, slower "
                                "small batches).")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks each replica splits the model "
                                      "over (tensor parallelism: one process and one device "
                                      "each; attention heads, MLP and vocabulary split, KV heads "
                                      "split or replicated). Must divide the attention heads, "
                                      "the intermediate size(s) (and a Gated DeltaNet hybrid's "
                                      "linear_num_key_heads / linear_num_value_heads) and divide "
                                      "or be a multiple of the KV heads; checked against the "
                                      "checkpoint at deploy. Pools may set their own; the "
                                      "hand-off pairs any degrees (a hybrid's recurrent states "
                                      "too).")
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
    speculative: SpeculativeSpec | None = Field(None, description="Speculative decoding on "
                                                "the decode (and colocated) replicas; None: off. "
                                                "See models[].model.speculative.")

    max_loras: int = Field(0, ge=0, le=64, description="LoRA adapters one replica holds on its "
                           "device at once (each a slot of max_lora_rank on every projection); "
                           "requests of further adapters wait for a slot, evicting the least "
                           "recently used adapter no running request uses. 0: no adapters.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank served; "
                               "every slot is this wide (memory and kernel work grow with it).")
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters a replica keeps in "
                                      "host memory (least recently used dropped first, re-read "
                                      "from their path when needed again); None: 4 per slot.")
    adapters: list[AdapterSpec] = Field(default_factory=list, description="LoRA adapters served "
                                        "from the start (more load at run time through POST "
                                        "/v1/load_lora_adapter); needs max_loras >= 1.")

    @model_validator(mode="after")
    def _power_of_two(self) -> "ModelSpec":
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self

    @model_validator(mode="after")
    def _adapters(self) -> "ModelSpec":
        if self.adapters and self.max_loras < 1:
            raise ValueError(f"model {self.name!r} lists adapters but max_loras is 0: set "
                             "max_loras to the adapters a replica holds at once")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras})")
        names = [a.name for a in self.adapters]
        dup = {n for n in names if names.count(n) > 1} | ({self.name} & set(names))
        if dup:
            raise ValueError(f"adapter names must be unique and differ from the model's: "
                             f"{sorted(dup)}")
        return self


class AutoscalingSpec(_Strict):
    bottleneck: Literal["compute", "memory", "network", "requests"] = Field(
        ..., description="What limits this pool: prefill is compute-bound, decode memory-bound; "
        "network scales on hand-off bandwidth (and makes the router prefer local prefill); "
        "requests scales on queue length alone (running + waiting requests per replica "
        "against target_ongoing_requests, Ray Serve's default policy).")
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
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests: target running "
                                           "plus waiting requests per replica.")
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


class PoolEngineSpec(_Strict):
    """Engine settings one pool sets for itself where the roles differ (a
    prefill pool wants large chunks and few sequences; a decode pool many
    sequences and much KV; prefill a wider tensor-parallel split). Unset keys
    keep the model's. What must match across the hand-off (checkpoint,
    dtypes, block size) stays per model; tensor-parallel degrees need not
    match (the hand-off moves whole heads)."""

    max_num_seqs: int | None = Field(None, ge=1, description="Sequences one replica of this "
                                     "pool runs at once; None: the model's.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Token budget of one "
                                               "engine step (the prefill chunk size); None: the "
                                               "model's.")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="KV cache per replica of "
                                             "this pool; None: the model's.")
    num_blocks: int | None = Field(None, ge=16, description="KV blocks per replica of this "
                                   "pool (wins over kv_cache_memory_gb); None: the model's.")
    enforce_eager: bool | None = Field(None, description="CUDA graphs off for this pool; "
                                       "None: the model's.")
    tensor_parallel_size: int | None = Field(None, ge=1, description="Ranks each replica of "
                                             "this pool splits the model over (e.g. prefill 4, "
                                             "decode 2); the replica reserves num_cpus and "
                                             "num_gpus per rank. None: the model's.")


MAX_REPLICAS = 10_000  # per pool (tens of thousands of GPUs); past it a typo's extra digits


class PoolSpec(_Strict):
    min_replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Fewest replicas; at least "
                              "1 when the pool autoscales (its metrics come from running "
                              "replicas).")
    max_replicas: int = Field(1, ge=1, le=MAX_REPLICAS, description="Most replicas (at most "
                              f"{MAX_REPLICAS} per pool).")
    initial_replicas: int | None = Field(None, ge=0, le=MAX_REPLICAS, description="Replicas "
                                         "at first deploy; "
                                         "None: min_replicas. Ignored when re-applied to a "
                                         "running pool.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves, per "
                            "tensor-parallel rank.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves, per "
                            "tensor-parallel rank (0 or 1 when tensor_parallel_size > 1: each "
                            "rank has a GPU of its own).")
    node_type: str | None = Field(None, description="Custom resource the replica requests "
                                  "(e.g. 'prefill_node'), so it lands on that node type.")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra custom Ray "
                                        "resources each replica requests.")
    graceful_shutdown_timeout_s: float = Field(30.0, gt=0, description="How long a replica being "
                                               "removed may drain its in-flight requests.")
    rollout_surge: bool = Field(True, description="When a redeploy rebuilds the pool's replicas, "
                                "start one replacement before an old replica drains, so a pool "
                                "of one keeps serving; the rollout then needs room for one extra "
                                "replica (and waits for it). false: old replicas stop first, for "
                                "clusters without that room (every GPU in use, no node "
                                "autoscaling): the pool runs one short, or has none for a pool "
                                "of one, while each is replaced.")
    autoscaling: AutoscalingSpec | None = Field(None, description="Scale on the pool's "
                                                "bottleneck; None: a fixed size.")
    engine: PoolEngineSpec = Field(default_factory=PoolEngineSpec, description="Engine "
                                   "settings of this pool's replicas that differ from the "
                                   "model's (batch caps, chunk size, KV memory, CUDA graphs).")

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

    def ray_actor_options(self, tensor_parallel_size: int = 1) -> dict[str, Any]:
        """The replica actor's resources: CPUs and GPUs for each of its
        ``tensor_parallel_size`` ranks (they are processes the replica
        starts, on its node, using the GPUs Ray gives it)."""
        res = dict(self.resources)
        if self.node_type:
            res[self.node_type] = res.get(self.node_type, 0.01) or 0.01
        tp = tensor_parallel_size
        opts: dict[str, Any] = {"num_cpus": self.num_cpus * tp, "num_gpus": self.num_gpus * tp}
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

    @model_validator(mode="after")
    def _tensor_parallel_gpus(self) -> "ServedModel":
        for role in self.roles():
            tp, gpus = self.engine_spec(role).tensor_parallel_size, self.pool(role).num_gpus
            if tp > 1 and gpus not in (0, 1):
                raise ValueError(
                    f"the {role.value} pool runs tensor_parallel_size {tp} with num_gpus {gpus}: "
                    "num_gpus counts per rank and must be 0 (CPU) or 1 (a GPU per rank)")
        return self

    def roles(self) -> tuple[Role, ...]:
        """The roles of this model's pools, one Serve application each."""
        return (Role.COLOCATED,) if self.mode == "colocated" else (Role.PREFILL, Role.DECODE)

    def pool(self, role: Role) -> PoolSpec:
        """The spec of the pool playing ``role`` (a colocated pool is the decode spec)."""
        return self.prefill if role is Role.PREFILL else self.decode

    def engine_spec(self, role: Role) -> ModelSpec:
        """The model spec the replicas of the pool playing ``role`` run: the
        model's, with that pool's engine settings over it."""
        overrides = self.pool(role).engine.model_dump(exclude_none=True)
        if overrides.get("num_blocks") is None and "kv_cache_memory_gb" in overrides:
            overrides["num_blocks"] = None  # the pool sizes its KV by memory
        return self.model.model_copy(update=overrides) if overrides else self.model
