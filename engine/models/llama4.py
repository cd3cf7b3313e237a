"""Llama 4's text decoder (``Llama4ForCausalLM``, and the text tower of
``Llama4ForConditionalGeneration``), as transformers' ``modeling_llama4`` computes it.

- RoPE on adjacent dim pairs (its complex form): q/k rows (and biases) reordered at
  load as Helium's (``splitserve.engine.models.helium``), so the rotate-half kernels
  compute it.
- NoPE layers (``FamilyOptions.nope_layers``): no rotation, as SmolLM3's; on them,
  with attention temperature tuning, each query is multiplied by
  ``1 + attn_scale * log1p(floor((position + 1) / floor_scale))`` in float32 and
  rounded back. On the RoPE layers, with ``use_qk_norm``, q and k are divided by
  their root mean square over each head's dims (no weight, eps ``rms_norm_eps``)
  once rotated, through the RMSNorm kernel with a unit weight. Both in
  ``Llama4Attention.position_qk``; keys are cached as the kernel takes them.
- Mixture-of-experts layers (``feed_forward``): the router (``feed_forward.router``)
  keeps each token's top-k logits and scales the token by their sigmoid *before*
  each chosen expert, whose output is added unweighted; an ungated shared expert
  is added to them. The fused expert kernel (``ops.fused_moe``) runs this with one
  row per (token, chosen expert), the scaled token, and weight 1. The checkpoint's
  fused ``experts.gate_up_proj`` [E, hidden, 2I] (columns [gate | up]) and
  ``experts.down_proj`` [E, I, hidden] are split and transposed at load into the
  per-expert names ``SparseMoeBlock`` reads. The other layers have a dense SwiGLU
  ``feed_forward`` of ``intermediate_size_mlp``.
- ``Llama4ForConditionalGeneration``: the text model's tensors are read from under
  ``language_model.``; the vision tower's and projector's are skipped (the engine
  takes text only).
Tensor parallelism splits heads, experts, the shared expert and the dense MLP as
for the Llama-like families. LoRA adapters are refused (q/k rows reordered).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.dialects.llama4 import WRAPPED
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.helium import HeliumCausalLM
from splitserve.engine.models.layers import Attention
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.engine.models.smollm3 import SmolLM3CausalLM
from splitserve.kernels import ops

_SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")  # Llama4ForConditionalGeneration's


class Llama4Attention(Attention):
    """Attention with Llama 4's q/k L2 norm (RoPE layers) and query temperature (NoPE layers)."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        opts = cfg.options
        self.l2_eps = cfg.rms_norm_eps if opts.rope_qk_l2_norm else None
        self.temperature_floor, self.temperature_scale = opts.temperature_floor, opts.temperature_scale
        self.register_buffer("unit_weight", torch.ones(self.head_dim, dtype=dtype, device=device),
                             persistent=False)

    def position_qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin_cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if cos_sin_cache is not None:
            if self.l2_eps is not None:
                q, k = self.l2_norm(q), self.l2_norm(k)
        elif self.temperature_floor:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.temperature_floor))
            q = (q * (scales * self.temperature_scale + 1.0)[:, None, None]).to(q.dtype)
        return q, k

    def l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, D] divided by each head's root mean square (Llama4TextL2Norm)."""
        return ops.rms_norm(x.reshape(-1, self.head_dim), self.unit_weight, self.l2_eps)[0].view(x.shape)


class Llama4DecoderLayer(DecoderLayer):
    attention_class = Llama4Attention


class Llama4MoeBlock(SparseMoeBlock):
    """Llama 4's experts: sigmoid top-k scores scaling each expert's input, plus
    the ungated shared expert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h = x.shape
        top, ids = torch.topk(self.gate(x), self.top_k, dim=-1)  # [T, K] of the router's logits
        scores = torch.sigmoid(top.float()).to(x.dtype)
        rows = (x[:, None, :] * scores[..., None]).reshape(t * self.top_k, h)  # expert inputs
        ones = torch.ones(t * self.top_k, 1, dtype=torch.float32, device=x.device)
        routed = self.run_experts(rows, ones, ids.reshape(-1, 1)).view(t, self.top_k, h).sum(dim=1)
        return self.shared_expert(x) + routed


class Llama4CausalLM(HeliumCausalLM, SmolLM3CausalLM):
    """Llama 4 (``Llama4ForCausalLM``, ``Llama4ForConditionalGeneration``'s text part):
    q/k rows reordered (Helium's, LoRA adapters' lora_B rows too), NoPE layers (SmolLM3's),
    fused experts split at load."""

    @property
    def lora_refusal(self) -> str:
        if self.cfg.architecture == "Llama4ForConditionalGeneration":
            return ("LoRA adapters are not supported for Llama4ForConditionalGeneration checkpoints "
                    "(PEFT names the wrapper's modules); serve its text model as Llama4ForCausalLM "
                    "for them")
        return ""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        mlp = (Llama4MoeBlock(cfg, dtype, device, prefix=f"{prefix}.feed_forward")
               if cfg.moe.sparse_layers[index] else None)
        return Llama4DecoderLayer(cfg, dtype, device, window, mlp=mlp, mlp_name="feed_forward", prefix=prefix)

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if self.cfg.architecture == WRAPPED:
            if name.startswith(_SKIPPED_PREFIXES):
                return ()
            name = name.removeprefix("language_model.")
        if name.endswith(".feed_forward.router.weight"):
            return ((name.replace(".router.", ".gate."), tensor),)
        if name.endswith((".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")):
            return self.split_experts(name, tensor)
        return super().mapped(name, tensor)

    def split_experts(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """A fused [E, hidden, 2I] gate_up_proj or [E, I, hidden] down_proj -> each
        expert's gate_proj / up_proj [I, hidden] or down_proj [hidden, I]."""
        full = self.cfg if self.tp is None else self.tp.plan.cfg  # this rank narrows them later
        e, i, h = full.moe.num_experts, full.moe.expert_intermediate_size, full.hidden_size
        gate_up = name.endswith("gate_up_proj")
        want = (e, h, 2 * i) if gate_up else (e, i, h)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"tensor {name!r}: expected shape {list(want)}, got {list(tensor.shape)}")
        base = name.rpartition(".")[0]
        for j in range(e):
            if gate_up:
                yield f"{base}.{j}.gate_proj.weight", tensor[j, :, :i].T
                yield f"{base}.{j}.up_proj.weight", tensor[j, :, i:].T
            else:
                yield f"{base}.{j}.down_proj.weight", tensor[j].T
