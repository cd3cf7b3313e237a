"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5, dots.llm1,
PhiMoE, FlexOlmo, MiniMax-M2, DeepSeek-V2/V3, GLM-4.7-Flash, ERNIE 4.5 MoE and HunYuan
MoE (the experts of GraniteMoE, DBRX, Llama 4 and gpt-oss too:
``splitserve.engine.models.granitemoe``, ``dbrx``, ``llama4``, ``gpt_oss``).

They are the dense decoder of ``splitserve.engine.models.llama`` with a
sparse MLP in some or all layers (``ModelConfig.moe.sparse_layers``): a
router (``gate``, a [E, hidden] linear) scores the experts for each token,
the ``top_k`` best run through ``ops.fused_moe`` and their outputs are
summed with the routing weights. Qwen2-MoE adds a shared expert that every
token runs, scaled by a sigmoid gate; GLM-4.5 and dots.llm1 an ungated one
(``shared_experts``).

Routing, as transformers does it: softmax over all experts' logits in
float32, then the top k; Mixtral renormalises the k probabilities to sum to
one (the same as a softmax over the top-k logits), Qwen only with
``norm_topk_prob``. GLM-4.5, dots.llm1 and MiniMax-M2 route with sigmoid scores, a
correction bias and expert groups (``MoEConfig.grouped_sigmoid``,
``splitserve.engine.models.grouped_router``), their router and its bias in
float32 whatever the model dtype, as transformers keeps them. PhiMoE routes
with its sparsemixer (``splitserve.engine.models.sparsemixer``); DBRX divides
the top-k weights by their p-norm (``MoEConfig.expert_weight_norm``).

Checkpoints store each expert's projections separately
(``...block_sparse_moe.experts.3.w1.weight`` in Mixtral,
``...mlp.experts.3.gate_proj.weight`` in Qwen); they are loaded into two
stacked weights, ``w_gate_up`` [E, 2I, hidden] (rows [gate | up] per expert)
and ``w_down`` [E, hidden, I], the layout the fused kernel reads. Every
replica holds every expert.

FP8 experts (an fp8 checkpoint's, or ``quantize_fp8_``'s, one scale per
output channel) stay fp8 in the same stacked layout, with stacked scales
``w_gate_up_scale`` / ``w_down_scale``, and run weight-only through
``ops.fp8_fused_moe``: the fused Triton kernel decodes each weight tile on
GPUs, the torch reference dequantizes each chosen expert as it runs on the
CPU. The router stays in the model dtype unless the checkpoint stores it in
fp8 (then it is an fp8 ``Linear`` like any other projection).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.grouped_router import route_grouped, route_softmax_groups
from splitserve.engine.models.layers import (
    MLP,
    Linear,
    ShardSlot,
    empty_param,
    linear_slots,
    scale_slot,
)
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.sparsemixer import route_sparsemixer
from splitserve.engine.quantization import Groups, layer_groups
from splitserve.kernels import ops
from splitserve.kernels.fp8_gemm import FP8_WEIGHT_DTYPE, quantize_weight, scale_shape

# family -> (the sparse block's name in checkpoints, its experts' (gate, up, down) names)
CHECKPOINT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # their fused input_linear / output_linear split into these at load
    # (splitserve.engine.models.granitemoe)
    "granitemoe": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
    "granitemoeshared": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "dots1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "phimoe": ("block_sparse_moe", ("w1", "w3", "w2")),
    # its fused ffn.experts.mlp.w1 / v1 / w2 split into these at load (splitserve.engine.models.dbrx)
    "dbrx": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # its fused gate_up_proj / down_proj split into these at load (splitserve.engine.models.llama4)
    "llama4": ("feed_forward", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "flex_olmo": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "minimax_m2": ("block_sparse_moe", ("w1", "w3", "w2")),
    "ernie4_5_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "hunyuan_v1_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # its experts.gate_up_proj / down_proj split into these at load (splitserve.engine.models.granitemoe_swa)
    "granitemoe_swa": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
    "exaone_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "cohere2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "solar_open": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe_lite": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mimo_v2_flash": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "axk1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "kolibri1": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "minicpm5_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "afmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "sarvam_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "param2moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "sarvam_mla": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "flint": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "hy_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # LongCat-Flash's shortcut experts (splitserve.engine.models.longcat_flash)
    "longcat_flash": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_next": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # its block_sparse_moe renamed mlp at load (splitserve.engine.models.kimi_linear)
    "kimi_linear": ("mlp", ("w1", "w3", "w2")),
    # per expert, or fused experts split at load (splitserve.engine.models.qwen3_5)
    "qwen3_5_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "lfm2_moe": ("feed_forward", ("w1", "w3", "w2")),
    # split from input_linear / output_linear at load, as GraniteMoE's
    "granitemoehybrid": ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
    # its feed_forward.router renamed gate at load (splitserve.engine.models.jamba)
    "jamba": ("feed_forward", ("gate_proj", "up_proj", "down_proj")),
    "minimax": ("block_sparse_moe", ("w1", "w3", "w2")),
    "bailing_hybrid": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
# family -> its shared expert's checkpoint name where that expert has no gate
# (Qwen2-MoE's ``shared_expert`` is scaled by ``shared_expert_gate``)
UNGATED_SHARED_EXPERTS = {"glm4_moe": "shared_experts", "dots1": "shared_experts",
                          "llama4": "shared_expert", "deepseek_v2": "shared_experts",
                          "deepseek_v3": "shared_experts", "ernie4_5_moe": "shared_experts",
                          "hunyuan_v1_moe": "shared_mlp", "exaone_moe": "shared_experts",
                          "cohere2_moe": "shared_experts", "solar_open": "shared_experts",
                          "glm4_moe_lite": "shared_experts", "axk1": "shared_experts",
                          "kolibri1": "shared_experts", "minicpm5_moe": "shared_experts",
                          "afmoe": "shared_experts", "sarvam_moe": "shared_experts",
                          "param2moe": "shared_experts", "sarvam_mla": "shared_experts",
                          "flint": "shared_expert", "hy_v3": "shared_mlp",
                          "kimi_linear": "shared_experts", "bailing_hybrid": "shared_experts"}


@dataclasses.dataclass(frozen=True)
class ExpertSlot(ShardSlot):
    """Rows [start, start + size) of expert ``expert``'s slice of a stacked [E, ...] weight."""

    expert: int = 0

    @property
    def target(self) -> torch.Tensor:
        t = self.param.data[self.expert]
        return t if self.start is None else t.narrow(0, self.start, self.size)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          norm_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, K] float32, expert ids [T, K] int64);
    ``norm_p`` (DBRX): the weights divided by their p-norm."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    elif norm_p is not None:
        weights = weights / torch.norm(weights, p=norm_p, dim=-1, keepdim=True)
    return weights, ids


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 prefix: str = "mlp"):
        super().__init__()
        moe = cfg.moe
        h, i, e = cfg.hidden_size, moe.expert_intermediate_size, moe.num_experts
        self.moe, self.top_k, self.renormalize, self.intermediate = moe, moe.top_k, moe.renormalize, i
        self.expert_names = CHECKPOINT_NAMES[cfg.family][1]
        self.quant = quant = cfg.quantization
        gate_dtype = torch.float32 if moe.grouped_sigmoid or moe.scaled_softmax else dtype
        self.gate = Linear(h, e, False, gate_dtype, device,  # the router
                           fp8_groups=layer_groups(quant, [(f"{prefix}.gate.weight", e)], h))
        self.e_score_correction_bias = (empty_param(e, dtype=torch.float32, device=device)
                                        if moe.grouped_sigmoid else None)
        self.gate_up_groups, self.down_groups = self._expert_groups(prefix, e, h, i)
        self.w_gate_up, self.w_gate_up_scale = self._experts(e, 2 * i, h, self.gate_up_groups, dtype, device)
        self.w_down, self.w_down_scale = self._experts(e, h, i, self.down_groups, dtype, device)
        self.shared_expert = self.shared_expert_gate = None
        self.shared_name = UNGATED_SHARED_EXPERTS.get(cfg.family, "shared_expert")
        if moe.shared_expert_intermediate_size:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=moe.shared_expert_intermediate_size)
            self.shared_expert = MLP(shared_cfg, dtype, device, prefix=f"{prefix}.{self.shared_name}")
            if cfg.family not in UNGATED_SHARED_EXPERTS:
                self.shared_expert_gate = Linear(
                    h, 1, False, dtype, device,
                    fp8_groups=layer_groups(quant, [(f"{prefix}.shared_expert_gate.weight", 1)], h))

    def _expert_groups(self, prefix: str, e: int, h: int, i: int) -> tuple[Groups | None, Groups | None]:
        """The fp8 scale groups of the stacked expert weights (None: not fp8);
        every expert must be stored alike."""
        gate, up, down = self.expert_names
        p = f"{prefix}.experts"
        gate_up = {layer_groups(self.quant, [(f"{p}.{j}.{gate}.weight", i), (f"{p}.{j}.{up}.weight", i)], h)
                   for j in range(e)}
        downs = {layer_groups(self.quant, [(f"{p}.{j}.{down}.weight", h)], i) for j in range(e)}
        if len(gate_up) > 1 or len(downs) > 1 or (None in gate_up) != (None in downs):
            raise CheckpointError(f"the experts of {prefix} are not all stored alike (fp8 scale groups "
                                  f"{sorted(map(str, gate_up | downs))}); quantize every expert projection "
                                  "the same way, or none")
        return gate_up.pop(), downs.pop()

    @staticmethod
    def _experts(e: int, n: int, k: int, groups: Groups | None, dtype: torch.dtype,
                 device: torch.device | str) -> tuple[nn.Parameter, nn.Parameter | None]:
        """Stacked expert weights [E, n, k] (and their [E, ...] fp8 scales)."""
        if groups is None:
            return empty_param(e, n, k, dtype=dtype, device=device), None
        return (empty_param(e, n, k, dtype=FP8_WEIGHT_DTYPE, device=device),
                empty_param(e, *scale_shape(n, k, *groups), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> router logits [T, E] -> K experts per token -> [T, hidden]
        if self.e_score_correction_bias is not None:  # GLM-4.5, dots.llm1, DeepSeek-V3: in float32
            weights, ids = route_grouped(self.gate(x.float()), self.e_score_correction_bias, self.moe)
        elif self.moe.scaled_softmax:  # DeepSeek-V2: in float32
            weights, ids = route_softmax_groups(self.gate(x.float()), self.moe)
        elif self.moe.sparsemixer_eps is not None:  # PhiMoE
            weights, ids = route_sparsemixer(self.gate(x), self.moe.sparsemixer_eps)
        else:
            weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.moe.expert_weight_norm)
        out = self.run_experts(x, weights, ids)
        if self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum per token ([T, hidden]; ``weights``, ``ids``:
        [T, K]), through the fused kernel (its fp8 form for fp8 experts)."""
        if self.w_gate_up_scale is None:
            return ops.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        return ops.fp8_fused_moe(x, self.w_gate_up, self.w_gate_up_scale, self.gate_up_groups,
                                 self.w_down, self.w_down_scale, self.down_groups, weights, ids)

    @torch.no_grad()
    def quantize_fp8_(self) -> None:
        """Experts (and the shared expert) to fp8, one scale per output channel
        of each expert; the router and the shared expert's gate stay as they are."""
        if self.shared_expert is not None:
            self.shared_expert.quantize_fp8_()
        if self.w_gate_up_scale is not None:
            return
        for name, w in (("w_gate_up", self.w_gate_up), ("w_down", self.w_down)):
            k = w.shape[2]
            pairs = [quantize_weight(w.data[j], 1, k) for j in range(w.shape[0])]
            setattr(self, name, nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(torch.stack([s for _, s in pairs]),
                                                        requires_grad=False))
            del pairs
        self.gate_up_groups, self.down_groups = (1, self.w_gate_up.shape[2]), (1, self.w_down.shape[2])

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        gate, up, down = self.expert_names
        i, h = self.intermediate, self.w_down.shape[1]
        slots = linear_slots(self.gate, [(f"{prefix}.gate", 0, self.gate.out_features)], self.quant)
        if self.e_score_correction_bias is not None:
            slots[f"{prefix}.gate.e_score_correction_bias"] = ShardSlot(self.e_score_correction_bias)
        for e in range(self.w_gate_up.shape[0]):
            p = f"{prefix}.experts.{e}"
            slots[f"{p}.{gate}.weight"] = ExpertSlot(self.w_gate_up, 0, i, expert=e)
            slots[f"{p}.{up}.weight"] = ExpertSlot(self.w_gate_up, i, i, expert=e)
            slots[f"{p}.{down}.weight"] = ExpertSlot(self.w_down, expert=e)
            if self.w_gate_up_scale is not None:
                for name, param, row, rows, k, groups in (
                        (gate, self.w_gate_up_scale, 0, i, h, self.gate_up_groups),
                        (up, self.w_gate_up_scale, i, i, h, self.gate_up_groups),
                        (down, self.w_down_scale, 0, h, i, self.down_groups)):
                    info = self.quant.weights[f"{p}.{name}.weight"]
                    slots[info.scale_name] = scale_slot(param, row, rows, k, info.groups, groups[0], expert=e)
        if self.shared_expert is not None:
            slots.update(self.shared_expert.weight_slots(f"{prefix}.{self.shared_name}"))
        if self.shared_expert_gate is not None:
            slots.update(linear_slots(self.shared_expert_gate, [(f"{prefix}.shared_expert_gate", 0, 1)],
                                      self.quant))
        return slots


class MoECausalLM(CausalLM):
    """The decoder with a ``SparseMoeBlock`` in the layers ``cfg.moe`` marks sparse;
    ``layer_class``: its decoder layer (DeepSeek's has latent attention);
    ``moe_block_class``: its sparse MLP (A.X K1's norms the experts' output)."""

    layer_class: type[DecoderLayer] = DecoderLayer
    moe_block_class: type[SparseMoeBlock] = SparseMoeBlock

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        if not cfg.moe.sparse_layers[index]:  # Qwen mlp_only_layers / decoder_sparse_step
            return self.layer_class(cfg, dtype, device, window, prefix=prefix)
        name = CHECKPOINT_NAMES[cfg.family][0]
        return self.layer_class(cfg, dtype, device, window, prefix=prefix, mlp_name=name,
                                mlp=self.moe_block_class(cfg, dtype, device, prefix=f"{prefix}.{name}"))
