"""What a simulation is asked to do, apart from the cluster and the workload:
``SimOptions`` (timings the simulator assumes, failures to inject,
speculation's rates), the engine settings whose measured step times a
replica takes (``engine_settings``, shared with the planner) and
``scale_blocks`` (coarser KV blocks for speed)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.cluster.config import ClusterConfig, ModelSpec
from splitserve.cluster.planning.records import EngineSettings
from splitserve.cluster.planning.sim.speculation import ASSUMED_ACCEPTANCE, DRAFT_COST_RATIO


class SimConfigError(ValueError):
    """The simulation cannot be set up as asked; the message says what to change."""


@dataclass(frozen=True)
class Failure:
    at_s: float
    pool: str  # app name (default-decode) or role (prefill, decode, colocated)
    count: int = 1


@dataclass(frozen=True)
class SimOptions:
    seed: int = 0
    drain_s: float = 600.0  # after the last arrival, how long in-flight requests may take
    control_interval_s: float = 0.5  # Serve controller ticks (the autoscaling policy)
    sample_s: float = 1.0  # pools' timeline resolution
    rpc_s: float = 0.0005  # one RPC hop (ingress -> router -> decode -> prefill)
    stream_s: float = 0.0005  # a token from the decode replica to the client
    network_latency_s: float = 20e-6
    node_provision_s: float = 0.0  # a new node when no free slot (0: spare nodes exist)
    replace_after_s: float = 10.0  # Serve replaces a failed replica after this
    # a replica's start-up, launch to serving; None: the profile's (a measured
    # engine build leaves out the Serve replica's process start and imports)
    replica_start_s: float | None = None
    # add the serving path's measured overhead (per decode step, sequence and
    # request) where the database has it; False: the engine's step times only
    serving_overhead: bool = True
    devices_per_node: int = 8
    coalesce: bool = True  # coalesce decode steps (identical results, faster)
    kv_block_scale: int = 1  # simulate KV blocks this many times larger (faster, approximate)
    failures: tuple[Failure, ...] = ()
    progress: bool = False
    # speculative decoding: the drafts' per-token acceptance rate by method
    # (None: the profile database's measured rate for the model, of
    # ``spec_workload`` where given, else ASSUMED_ACCEPTANCE; planning.acceptance)
    # and a draft model's step cost relative to the target's (sim.speculation)
    spec_acceptance_ngram: float | None = None
    spec_acceptance_draft: float | None = None
    spec_workload: str | None = None
    draft_cost_ratio: float = DRAFT_COST_RATIO

    def given_acceptance(self, method: str) -> float | None:
        """The acceptance rate given for ``method`` (None: not given)."""
        return self.spec_acceptance_draft if method == "draft" else self.spec_acceptance_ngram

    def acceptance(self, method: str) -> float:
        """The rate given for ``method``, else the assumed one (a simulation
        resolves the database's measured rate first: ``Simulation.acceptance``)."""
        given = self.given_acceptance(method)
        return ASSUMED_ACCEPTANCE[method] if given is None else given


def engine_settings(mspec: ModelSpec, device: str, devices: int,
                    fp8_checkpoint: bool = False) -> EngineSettings:
    """The speed-relevant settings of a replica of ``mspec`` on ``device``.

    fp8 weights (``weight_dtype: fp8``) make ``dtype`` "fp8": the step-time
    model is then fitted from the database's fp8 rows where they were
    measured, else the roofline reads the weights at one byte per parameter
    (half of bf16's) and computes at the device's fp8 rate
    (``step_model.roofline``). The planner's estimate builds its settings
    here too (``planner.devices.engine_settings_for``), so both time fp8 by
    this one rule. An fp8 checkpoint (``fp8_checkpoint``: ``ModelShape.
    fp8_weights``) runs in fp8 on a GPU whatever ``weight_dtype`` says. The
    KV cache keeps the activations' dtype unless it is fp8 itself."""
    if device == "cpu":
        from splitserve.kernels.dispatch import backend_for
        import torch

        backend = backend_for(torch.device("cpu"))
        dtype = "float32" if mspec.dtype in ("auto", "float32", "bfloat16") else mspec.dtype
    else:
        backend = "triton"
        dtype = "bfloat16" if mspec.dtype == "auto" else mspec.dtype
    kv = "fp8" if mspec.kv_cache_dtype == "fp8" else dtype
    if mspec.weight_dtype == "fp8" or (fp8_checkpoint and device != "cpu"):
        dtype = "fp8"
    return EngineSettings(dtype=dtype, kv_dtype=kv, block_size=mspec.block_size,
                          max_num_seqs=mspec.max_num_seqs,
                          max_num_batched_tokens=mspec.max_num_batched_tokens,
                          kernel_backend=backend, device=device, tensor_parallel=devices)


def scale_blocks(cfg: ClusterConfig, k: int) -> ClusterConfig:
    """``cfg`` with KV blocks ``k`` times larger and ``k`` times fewer (the
    same KV memory): per-block work (allocation, hashing, the router's
    prefix index) shrinks k-fold, at the price of coarser granularity
    (prefix hits and memory rounding in steps of k blocks)."""
    if k & (k - 1):
        raise SimConfigError(f"kv_block_scale must be a power of two, got {k}")
    models = []
    for served in cfg.models:
        m = served.model
        upd = {"block_size": m.block_size * k}
        if m.num_blocks is not None:
            upd["num_blocks"] = max(16, m.num_blocks // k)
        pools = {}
        for role in ("prefill", "decode"):  # a pool's own KV blocks scale the same way
            pool = getattr(served, role)
            if pool.engine.num_blocks is not None:
                eng = pool.engine.model_copy(update={"num_blocks": max(16, pool.engine.num_blocks // k)})
                pools[role] = pool.model_copy(update={"engine": eng})
        models.append(served.model_copy(update={"model": m.model_copy(update=upd), **pools}))
    return cfg.model_copy(update={"models": models})
