"""A plan as a value, and as the operator YAML ``splitserve deploy`` takes.

Only the keys a plan decides are written: the model's engine settings (those
both pools share: dtypes, block size, speculative decoding), the pools
(replicas, GPUs per replica, autoscaling, and each pool's own engine
settings under ``engine``: batch cap, chunk size, KV memory, tensor
parallelism), the router and the SLO.
With a current config (re-planning), everything else in it (endpoints,
auth, transfer timeouts, the model's name and path) is kept as it is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from splitserve.cluster.config import ClusterConfig, parse_config
from splitserve.cluster.config.models import MAX_REPLICAS


@dataclass(frozen=True)
class PoolEngine:
    """The engine settings one pool's replicas run with (the YAML's
    ``models[].prefill.engine`` / ``models[].decode.engine``)."""

    max_num_seqs: int
    max_num_batched_tokens: int  # the step's token budget: the prefill chunk size
    kv_cache_memory_gb: float  # per tensor-parallel rank, as the engine reads it


@dataclass(frozen=True)
class PoolPlan:
    device: int  # index into the planner's devices
    hardware: str  # its key ("local" for this CPU)
    tp: int
    replicas: int
    engine: PoolEngine
    cpu: bool = False
    threads: int = 1

    def size(self) -> str:
        """Replicas, device and TP degree: "2xh100-sxm tp2"."""
        return f"{self.replicas}x{self.hardware}" + (f" tp{self.tp}" if self.tp > 1 else "")


@dataclass(frozen=True)
class EnginePlan:
    """The engine settings both pools share: the KV hand-off needs the same
    block size and dtypes at both ends; speculation runs on decode only."""

    block_size: int
    kv_cache_dtype: str  # auto | fp8
    weight_dtype: str  # bfloat16 | fp8
    speculative: str  # off | ngram:K


@dataclass(frozen=True)
class Plan:
    layout: str  # colocated | disaggregated
    decode: PoolPlan  # the colocated pool when colocated
    prefill: PoolPlan | None
    engine: EnginePlan
    policy: str
    local_prefill_max_tokens: int
    autoscaling: str  # fixed | scale-down | burst
    deployable: bool = True
    predicted: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def pools(self) -> list[tuple[str, PoolPlan]]:
        if self.layout == "colocated":
            return [("colocated", self.decode)]
        return [("prefill", self.prefill), ("decode", self.decode)]

    @property
    def devices(self) -> int:
        return sum(p.replicas * p.tp for _, p in self.pools)

    def ratio(self) -> str:
        if self.layout == "colocated":
            return f"{self.decode.replicas} colocated"
        return f"{self.prefill.replicas}:{self.decode.replicas}"

    def alloc(self) -> tuple:
        """The hardware allocation: layout, and device, TP and replicas of each pool."""
        return (self.layout,) + tuple((role, p.device, p.tp, p.replicas) for role, p in self.pools)

    def label(self) -> str:
        e = self.engine

        def pool(role: str, p: PoolPlan) -> str:
            s = f"{role} {p.size()}"
            if role == "prefill":  # a prefill pool's batch cap follows its chunk
                return s + f" chunk {p.engine.max_num_batched_tokens}"
            return s + f" seqs {p.engine.max_num_seqs} chunk {p.engine.max_num_batched_tokens}"

        pools = ", ".join(pool(role, p) for role, p in self.pools)
        extra = [f"block {e.block_size}"]
        if e.kv_cache_dtype != "auto":
            extra.append(f"kv {e.kv_cache_dtype}")
        if e.weight_dtype != "bfloat16":
            extra.append(f"weights {e.weight_dtype}")
        if e.speculative != "off":
            extra.append(f"spec {e.speculative}")
        router = self.policy + (f"/local<={self.local_prefill_max_tokens}"
                                if self.layout == "disaggregated" and self.policy == "cost" else "")
        return f"{self.layout} [{pools}] {', '.join(extra)}, {router}, {self.autoscaling}"

    def key(self) -> tuple:
        return (self.layout, self.decode, self.prefill, self.engine, self.policy,
                self.local_prefill_max_tokens, self.autoscaling)

    def to_dict(self) -> dict:
        d = {"layout": self.layout, "pools": {r: asdict(p) for r, p in self.pools},
             "engine": asdict(self.engine), "router": {
                 "policy": self.policy, "local_prefill_max_tokens": self.local_prefill_max_tokens},
             "autoscaling": self.autoscaling, "deployable": self.deployable,
             "devices": self.devices, "ratio": self.ratio(), "label": self.label()}
        return d


@dataclass(frozen=True)
class EmitContext:
    model_name: str
    model_path: str | None
    ttft_s: float
    tpot_s: float
    trough: float  # lowest rate over the curve / peak rate
    network_bytes_per_s: float
    max_queue: int
    base: dict | None = None  # the current config (re-planning), as a mapping


def _pool(p: PoolPlan, role: str, plan: Plan, ctx: EmitContext) -> dict:
    pred = plan.predicted.get("pools", {}).get(role, {})
    n = p.replicas
    out: dict[str, Any] = {}
    if plan.autoscaling == "fixed":
        out.update(min_replicas=n, max_replicas=n)
    elif plan.autoscaling == "scale-down":
        low = n if ctx.trough >= 0.999 else max(1, math.ceil(n * ctx.trough))
        if ctx.trough >= 0.999:
            low = max(1, math.ceil(n / 2))
        out.update(min_replicas=low, max_replicas=n, initial_replicas=n)
    else:  # burst: the plan's size, room for half as many again
        out.update(min_replicas=n,
                   max_replicas=min(MAX_REPLICAS, max(n + 1, math.ceil(n * 1.5))))
    if p.cpu:
        out.update(num_cpus=p.threads, num_gpus=0)
    else:  # per rank: a replica of tp ranks reserves tp GPUs
        out.update(num_cpus=4, num_gpus=1)
    out["engine"] = {"max_num_seqs": p.engine.max_num_seqs,
                     "max_num_batched_tokens": p.engine.max_num_batched_tokens,
                     "kv_cache_memory_gb": round(max(p.engine.kv_cache_memory_gb, 0.01), 3),
                     "tensor_parallel_size": p.tp}
    if plan.autoscaling == "fixed":
        out["autoscaling"] = None
        return out
    if role == "prefill":
        busy = float(pred.get("busy", 0.7))
        out["autoscaling"] = {
            "bottleneck": "compute", "target_ttft_s": round(max(ctx.ttft_s / 2, 0.01), 4),
            "target_busy_fraction": round(min(0.95, max(0.5, busy * 1.15)), 3),
            "upscale_delay_s": 10, "downscale_delay_s": 300, "cooldown_s": 30,
            "look_back_s": 30, "metrics_interval_s": 5}
    else:
        seq = float(pred.get("seq_fraction", 0.6))
        kv = float(pred.get("kv_usage", 0.6))
        out["autoscaling"] = {
            "bottleneck": "memory",
            "target_kv_usage": round(min(0.95, max(0.3, kv * 1.15)), 3),
            "target_seq_fraction": round(min(0.95, max(0.3, seq * 1.15)), 3),
            "target_tpot_s": round(ctx.tpot_s, 5),
            "upscale_delay_s": 10, "downscale_delay_s": 300, "cooldown_s": 30,
            "look_back_s": 30, "metrics_interval_s": 5}
    return out


def config_dict(plan: Plan, ctx: EmitContext) -> dict:
    """The operator config of ``plan`` as a mapping (``parse_config`` accepts it)."""
    if not plan.deployable:
        raise ValueError(f"plan {plan.label()} uses modelled-only settings; it cannot be deployed")
    base = copy.deepcopy(ctx.base) if ctx.base else {"name": f"plan-{ctx.model_name}"}
    models = base.get("models") or [{}]
    served = models[0] if models else {}
    model = dict(served.get("model") or {})
    e = plan.engine
    cpu = plan.decode.cpu
    model.setdefault("name", ctx.model_name)
    if "path" not in model:
        model["path"] = ctx.model_path
    # the model's own values are the decode (or colocated) pool's; each pool's engine
    # section sets its own over them (ServedModel.engine_spec)
    d = plan.decode.engine
    model.update(dtype="auto" if cpu else "bfloat16", kv_cache_dtype=e.kv_cache_dtype,
                 block_size=e.block_size, max_num_seqs=d.max_num_seqs,
                 max_num_batched_tokens=d.max_num_batched_tokens,
                 device="cpu" if cpu else "cuda")
    model.pop("num_blocks", None)
    model.pop("tensor_parallel_size", None)  # each pool states its own
    model["kv_cache_memory_gb"] = round(max(d.kv_cache_memory_gb, 0.01), 3)
    if e.weight_dtype == "fp8":
        model["weight_dtype"] = "fp8"
    else:
        model.pop("weight_dtype", None)
    if e.speculative == "off":
        model.pop("speculative", None)
    else:
        method, k = e.speculative.split(":")
        model["speculative"] = {"method": method, "num_speculative_tokens": int(k)}
    planned = ("model", "mode", "prefill", "decode")
    new_served = {k: v for k, v in served.items() if k not in planned}
    new_served["model"] = model
    new_served["mode"] = plan.layout
    old_prefill = served.get("prefill") or {}
    old_decode = served.get("decode") or {}
    keep = ("node_type", "resources", "graceful_shutdown_timeout_s")

    def pool(old: dict, p: PoolPlan, role: str) -> dict:
        new = {**{k: old[k] for k in keep if k in old}, **_pool(p, role, plan, ctx)}
        old_engine = old.get("engine") or {}
        if "enforce_eager" in old_engine:  # not the plan's to decide
            new["engine"]["enforce_eager"] = old_engine["enforce_eager"]
        if not p.cpu and "num_cpus" in old:  # host CPUs of a GPU replica: not the plan's to set
            new["num_cpus"] = old["num_cpus"]
        return new

    if plan.layout == "disaggregated":
        new_served["prefill"] = pool(old_prefill, plan.prefill, "prefill")
    elif old_prefill:
        new_served["prefill"] = old_prefill
    new_served["decode"] = pool(old_decode, plan.decode, "decode" if plan.layout ==
                                "disaggregated" else "colocated")
    base["models"] = [new_served] + list(models[1:])
    router = dict(base.get("router") or {})
    router.update(policy=plan.policy, local_prefill_max_tokens=plan.local_prefill_max_tokens,
                  network_bytes_per_s=float(ctx.network_bytes_per_s))
    router["max_queue_per_model"] = max(int(router.get("max_queue_per_model", 0)), ctx.max_queue)
    base["router"] = router
    transfer = dict(base.get("transfer") or {})
    transfer["transport"] = "grpc" if cpu else "torch_dist"
    base["transfer"] = transfer
    base["slo"] = {"ttft_s": ctx.ttft_s, "tpot_s": ctx.tpot_s}
    return base


def to_config(plan: Plan, ctx: EmitContext) -> ClusterConfig:
    return parse_config(config_dict(plan, ctx), f"plan {plan.label()}")


HEADER = """# Written by `splitserve plan`: {label}
# Deploy with `splitserve deploy FILE` (or `splitserve serve --config FILE`).
"""


def to_yaml(plan: Plan, ctx: EmitContext) -> str:
    data = config_dict(plan, ctx)
    parse_config(data, "plan")  # refuse to write what deploy would refuse
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return HEADER.format(label=plan.label()) + body
