"""The sparse MLP of the mixture-of-experts families, as config.json describes it
(``MoEConfig``, read by ``parse_moe`` for ``splitserve.engine.config.ModelConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitserve.engine.dialects import DIALECTS


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts family (Mixtral, Qwen2/Qwen3-MoE, OLMoE,
    GraniteMoE, GLM-4.5, dots.llm1, PhiMoE, DBRX, gpt-oss, Llama 4, DeepSeek-V2/V3,
    FlexOlmo, MiniMax-M2, ERNIE 4.5 MoE, HunYuan MoE).

    Each token's router logits pick ``top_k`` of ``num_experts`` experts;
    their softmax probabilities weight the experts' outputs, renormalised to
    sum to one when ``renormalize`` (Mixtral always; Qwen with
    ``norm_topk_prob``). Layers where ``sparse_layers`` is False keep a dense
    MLP of ``ModelConfig.intermediate_size`` (Qwen ``mlp_only_layers`` and
    ``decoder_sparse_step``). Router jitter is a training option and is ignored."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    sparse_layers: tuple[bool, ...]
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a sigmoid-gated shared expert; 0 = none
    # GLM-4.5, dots.llm1 (their Glm4MoeTopkRouter / Dots1TopkRouter): sigmoid scores, a
    # learned per-expert bias added to them for choosing only, the ``topk_groups`` best of
    # ``num_groups`` expert groups (by the sum of each group's two best biased scores)
    # chosen first, then ``top_k`` experts among theirs; the chosen experts' unbiased
    # scores (renormalised with ``renormalize``) times ``routed_scaling_factor``
    # (splitserve.engine.models.grouped_router). Their shared experts have no gate.
    grouped_sigmoid: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    # PhiMoE's sparsemixer (its router_jitter_noise): two experts, each weighted by a softmax
    # over the experts within this relative distance (x 2) of it (splitserve.engine.models.sparsemixer);
    # None: the softmax router
    sparsemixer_eps: float | None = None
    # DBRX moe_normalize_expert_weights: the top-k weights divided by their p-norm of this p
    # (in place of ``renormalize``'s sum); None: not normalised so
    expert_weight_norm: float | None = None
    # gpt-oss (its GptOssTopKRouter / GptOssExperts): a router with a bias, the softmax over
    # the top-k logits; experts with biases whose gate (clamped above at ``swiglu_limit``)
    # and up (clamped to +-``swiglu_limit``) give (up + 1) * gate * sigmoid(gate *
    # ``swiglu_alpha``) (splitserve.engine.models.gpt_oss); 0: the plain SwiGLU experts
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 0.0
    # DeepSeek-V2 (DeepseekV2TopkRouter): softmax scores in float32, the top-k weights never
    # renormalised, times ``routed_scaling_factor``; with ``group_limited`` (its topk_method
    # group_limited_greedy) chosen only among the ``topk_groups`` best of ``num_groups``
    # groups, each rated by its best expert's score (grouped_router.route_softmax_groups)
    scaled_softmax: bool = False
    group_limited: bool = False
    # ERNIE 4.5 MoE (Ernie4_5_MoeTopKRouter): float32 softmax probabilities; the top k of
    # them plus the per-expert correction bias choose, their unbiased probabilities divided
    # by their sum clamped below at this ``moe_norm_min`` weigh
    # (splitserve.engine.models.ernie4_5_moe); None: another router
    corrected_softmax_norm_min: float | None = None
    # Cohere 2 MoE (Cohere2MoeTopKRouter, Cohere2MoeSparseMoeBlock): the top-k router logits
    # chosen in the model dtype, then weighted by their float32 softmax or, with
    # ``topk_sigmoid``, their sigmoid (divided by its sum with ``renormalize``), rounded to
    # the model dtype; ``shared_expert_average``: the shared experts' output and the routed
    # ones' averaged, not summed (splitserve.engine.models.cohere2_moe)
    topk_sigmoid: bool = False
    shared_expert_average: bool = False


def parse_moe(cfg: dict[str, Any], family: str, num_layers: int) -> MoEConfig | None:
    """The sparse MLP's shape and routing, as each family's transformers code reads it."""
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe") and not (
            family in DIALECTS and cfg.get("num_experts")):
        return None
    # Mixtral calls it num_local_experts; Qwen num_experts (transformers 5 writes either)
    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    top_k = int(cfg["num_experts_per_tok"])
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, number of experts "
                         f"({num_experts})]")
    if family == "mixtral":
        return MoEConfig(num_experts=num_experts, top_k=top_k,
                         expert_intermediate_size=int(cfg["intermediate_size"]),
                         renormalize=True, sparse_layers=(True,) * num_layers)
    step = int(cfg.get("decoder_sparse_step", 1))
    if step <= 0:
        raise ValueError(f"decoder_sparse_step must be positive, got {step}")
    dense = set(cfg.get("mlp_only_layers") or ())
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=int(cfg["moe_intermediate_size"]),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        shared_expert_intermediate_size=(int(cfg.get("shared_expert_intermediate_size") or 0)
                                         if family == "qwen2_moe" or family in DIALECTS else 0),
        **(cfg.get("moe_routing") or {}),  # a dialect's MoEConfig routing fields (GLM-4.5's)
    )
