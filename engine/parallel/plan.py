"""Which part of the model each tensor-parallel rank holds (pure arithmetic).

Megatron-style layout over ``size`` ranks:
- attention heads: rank r computes query heads [r*Hq/N, (r+1)*Hq/N) and the
  KV heads they read; with at least N KV heads each rank holds Hk/N of
  them, with fewer (N a multiple of Hk) each holds the one KV head its
  query heads share, replicated on N/Hk ranks;
- MLP (and each expert's, and Qwen2-MoE's shared expert's) intermediate
  dimension: I/N per rank;
- vocabulary (embedding rows, LM head rows and bias): ceil(V/N) per rank,
  the last shard padded with zero rows;
- q/k RMSNorms over all heads at once (OLMo 2, OLMoE, ...: ``full_qk_norm``):
  the weight slices of the rank's query and KV heads, the mean of squares
  summed over the ranks (``qk_norm``);
- other norms (RMSNorm, LayerNorm weights and biases) and learned position tables
  (GPT-2, OPT): whole on every rank, so the LayerNorm / ungated-MLP families
  (StarCoder2, Phi, GPT-NeoX, Falcon, GPT-2, ...) split as Llama does, by
  heads and intermediate dimension;
- Gated DeltaNet layers (Qwen3-Next, Qwen3.5): ``linear_num_key_heads / N``
  key heads per rank and the value heads each serves, so each rank's
  recurrent states hold its heads only (``GatedDeltaNetShape.split``).
``check`` says, with the numbers, why a model cannot be split N ways.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from splitserve.engine.config import ModelConfig
from splitserve.engine.parallel.scale_shards import check_fp8_split


class TensorParallelConfigError(ValueError):
    """The model cannot be split over this many ranks (the message says why)."""


def check(cfg: ModelConfig, size: int) -> None:
    """Raise TensorParallelConfigError unless ``cfg`` splits over ``size`` ranks."""
    if size < 1:
        raise TensorParallelConfigError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    problems = []
    if cfg.num_heads % size:
        problems.append(f"num_attention_heads ({cfg.num_heads}) is not a multiple of it")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"num_key_value_heads ({cfg.num_kv_heads}) neither divides it nor is a "
                        "multiple of it (KV heads are split, or replicated when fewer than ranks)")
    if cfg.intermediate_size % size:
        problems.append(f"intermediate_size ({cfg.intermediate_size}) is not a multiple of it")
    if cfg.moe is not None:
        if cfg.moe.expert_intermediate_size % size:
            problems.append(f"the experts' intermediate size ({cfg.moe.expert_intermediate_size}) "
                            "is not a multiple of it")
        if cfg.moe.shared_expert_intermediate_size % size:
            problems.append("shared_expert_intermediate_size "
                            f"({cfg.moe.shared_expert_intermediate_size}) is not a multiple of it")
    gdn = cfg.options.gated_delta_net
    if cfg.options.tensor_parallel_refusal:
        problems.append(cfg.options.tensor_parallel_refusal)
    elif gdn is not None:
        if gdn.num_k_heads % size:
            problems.append(f"linear_num_key_heads ({gdn.num_k_heads}) is not a multiple of it")
        if gdn.num_v_heads % size:
            problems.append(f"linear_num_value_heads ({gdn.num_v_heads}) is not a multiple of it")
    elif cfg.options.hybrid is not None:
        problems.append("its recurrent layers and their states are not split across ranks (serve it at "
                        "tensor_parallel_size 1)")
    problems += check_fp8_split(cfg, size)
    if problems:
        raise TensorParallelConfigError(
            f"{cfg.architecture} cannot run at tensor_parallel_size {size}: " + "; ".join(problems))


@dataclass(frozen=True)
class ShardPlan:
    """Rank ``rank`` of ``size``'s ranges of the full model ``cfg``."""

    cfg: ModelConfig
    size: int
    rank: int

    def __post_init__(self) -> None:
        check(self.cfg, self.size)
        if not 0 <= self.rank < self.size:
            raise TensorParallelConfigError(f"rank {self.rank} is not in [0, {self.size})")

    @property
    def num_local_heads(self) -> int:
        return self.cfg.num_heads // self.size

    @property
    def num_local_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.size)

    def q_heads(self) -> tuple[int, int]:
        n = self.num_local_heads
        return self.rank * n, (self.rank + 1) * n

    def kv_heads(self, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of the KV heads rank ``rank`` (default: this one) holds."""
        rank = self.rank if rank is None else rank
        hk = self.cfg.num_kv_heads
        if hk >= self.size:
            n = hk // self.size
            return rank * n, (rank + 1) * n
        h = rank * hk // self.size  # replicated: the head of this rank's query heads
        return h, h + 1

    def kv_head_owner(self, head: int) -> int:
        """The first rank holding KV head ``head`` (the one exports read)."""
        return next(r for r in range(self.size) if self.kv_heads(r)[0] <= head < self.kv_heads(r)[1])

    @property
    def vocab_shard(self) -> int:
        return -(-self.cfg.vocab_size // self.size)

    def vocab(self) -> tuple[int, int]:
        """[start, end) of the vocabulary rows this rank holds (end - start may
        be below ``vocab_shard`` on the last rank: zero padding fills it)."""
        start = self.rank * self.vocab_shard
        return min(start, self.cfg.vocab_size), min(start + self.vocab_shard, self.cfg.vocab_size)

    def gdn_channels(self, rank: int | None = None) -> tuple[tuple[int, int], ...]:
        """(start, size) of each run of a Gated DeltaNet layer's [q | k | v]
        channels rank ``rank`` (default: this one) holds, in its order: its
        q, k and v channels (``in_proj_qkv``'s and the convolution's rows,
        the convolution state's)."""
        g, r, n = self.cfg.options.gated_delta_net, self.rank if rank is None else rank, self.size
        k, v = g.key_dim // n, g.value_dim // n
        return (r * k, k), (g.key_dim + r * k, k), (2 * g.key_dim + r * v, v)

    def state_rows(self, kind: str, rank: int | None = None) -> tuple[tuple[int, int], ...]:
        """(start, size) of the runs of a sequence's recurrent state ``kind``
        (rows: dim 0 of its ``StateKind.shape``) rank ``rank`` holds, in its
        order: a Gated DeltaNet layer's conv channels, or its value heads."""
        g, r = self.cfg.options.gated_delta_net, self.rank if rank is None else rank
        if g is None:
            raise ValueError(f"{self.cfg.architecture}: no recurrent state is split across ranks")
        if kind == "conv":
            return self.gdn_channels(r)
        if kind == "recurrent":
            h = g.num_v_heads // self.size
            return ((r * h, h),)
        raise ValueError(f"no split of recurrent state {kind!r} is known")

    def local_config(self) -> ModelConfig:
        """The config of this rank's shard: the model built from it has the
        shard's shapes (heads, intermediate sizes, vocabulary rows, Gated
        DeltaNet heads and the recurrent states they keep)."""
        c, n = self.cfg, self.size
        moe = c.moe
        if moe is not None:
            moe = dataclasses.replace(
                moe, expert_intermediate_size=moe.expert_intermediate_size // n,
                shared_expert_intermediate_size=moe.shared_expert_intermediate_size // n)
        options = c.options
        if options.gated_delta_net is not None:
            gdn = options.gated_delta_net.split(n)
            options = dataclasses.replace(
                options, gated_delta_net=gdn,
                hybrid=dataclasses.replace(options.hybrid, states=gdn.states()))
        return dataclasses.replace(c, num_heads=self.num_local_heads,
                                   num_kv_heads=self.num_local_kv_heads,
                                   intermediate_size=c.intermediate_size // n,
                                   vocab_size=self.vocab_shard, moe=moe, options=options)
