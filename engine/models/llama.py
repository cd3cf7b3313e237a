"""One decoder-only transformer for the Llama, Mistral, Qwen2 and Qwen3 families.

The families differ only in flags read from ``ModelConfig``: q/k/v biases
(Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), o_proj/MLP biases (Llama
options), tied embeddings, GQA head counts and RoPE scaling. Families with
learned absolute positions (GPT-2, OPT: ``FamilyOptions.position_table``)
add a table row per token to its embedding instead of rotating q and k.

The model runs on a flat batch: the scheduled tokens of every sequence
concatenated, ``positions`` giving each token's position in its sequence and
``AttentionMetadata`` saying which cache slots and blocks belong to whom.
Checkpoint tensors are read by their Hugging Face names (``model.layers.3.
self_attn.q_proj.weight``...) and fused on load.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.alibi import shard_alibi_slopes
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import ShardSlot, empty_param, model_norm, norm_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.plain_blocks import ParallelDecoderLayer, PlainMLP
from splitserve.engine.models.rope import build_cos_sin_cache
from splitserve.engine.parallel.group import TPGroup
from splitserve.engine.parallel.qk_norm import SplitQKNorm
from splitserve.engine.parallel.sharding import shard_slots
from splitserve.kernels import ops
from splitserve.kernels.lora import LoraMeta

# Checkpoint entries that are not weights of this implementation but that
# older exports carry; skipped on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        windows = cfg.layer_windows or (0,) * cfg.num_layers
        self.layers = nn.ModuleList(self.build_layer(i, w, dtype, device) for i, w in enumerate(windows))
        self.norm = model_norm(cfg, cfg.hidden_size, dtype, device) if cfg.options.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        )
        self.lm_head_bias = (empty_param(cfg.vocab_size, dtype=dtype, device=device)
                             if cfg.options.lm_head_bias else None)  # Phi
        # GPT-2, OPT: learned absolute positions (max_position rows after the offset), no RoPE
        opts = cfg.options
        self.embed_positions = (empty_param(cfg.max_position + opts.position_offset, cfg.hidden_size,
                                            dtype=dtype, device=device)
                                if opts.position_table else None)
        self.register_buffer("cos_sin_cache", None if opts.position_table or opts.alibi  # ALiBi: no RoPE
                             else build_cos_sin_cache(cfg, device), persistent=False)
        self.tp: TPGroup | None = None  # tensor parallel: see attach_tensor_parallel

    def attach_tensor_parallel(self, tp: TPGroup) -> None:
        """Make this model (built from ``tp.plan.local_config()``) one rank
        of a tensor-parallel replica: vocabulary-parallel embedding and LM
        head, an all-reduce after each attention and MLP block (and one
        for all-head q/k norms), and the rank's part of each checkpoint
        tensor at load."""
        self.tp = tp
        for layer in self.layers:
            layer.tp = tp
            if getattr(layer.self_attn, "full_qk_norm", False) and layer.self_attn.q_norm is not None:
                layer.self_attn.split_qk_norm = SplitQKNorm(tp)
        shard_alibi_slopes(self.layers, tp.plan)  # ALiBi: the rank's heads' slopes

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        """Decoder layer ``index`` (attention window ``window``, 0 = none):
        with the plain MLP and the parallel residual where ``FamilyOptions``
        asks for them; families whose MLP differs (splitserve.engine.models.moe)
        override this."""
        prefix = f"model.layers.{index}"
        opts = self.cfg.options
        mlp = PlainMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp") if opts.plain_mlp else None
        layer = ParallelDecoderLayer if opts.parallel_residual else DecoderLayer
        return layer(self.cfg, dtype, device, window, mlp=mlp, prefix=prefix)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [L, 2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
        lora: LoraMeta | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm (if any): [T, hidden]. Writes this step's
        keys/values into ``kv_cache`` at ``meta.slot_mapping``; calls
        ``on_layer_done(i)`` once layer i's keys/values are stored. ``lora``:
        each token's adapter slot (after ``enable_lora``); None: the base model."""
        if kv_cache.shape[0] != len(self.layers):
            raise ValueError(
                f"kv_cache has {kv_cache.shape[0]} layers, the model has {len(self.layers)}"
            )
        x = self.embed(input_ids)  # [T, hidden]
        if self.embed_positions is not None:  # token + position, in transformers' order
            x = x + F.embedding(positions + self.cfg.options.position_offset, self.embed_positions)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, kv_cache[i], meta, self.rope_table(i), lora)
            if on_layer_done is not None:
                on_layer_done(i)
        if self.norm is not None:
            x, _ = self.norm(x, residual)
        elif residual is not None:
            x = x + residual
        return x

    def rope_table(self, index: int) -> torch.Tensor | None:
        """Layer ``index``'s cos/sin table; None: the layer applies no RoPE (every
        layer of a family with learned positions). Families whose layers rotate
        differently (Gemma 3, SmolLM3) override this."""
        return self.cos_sin_cache

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] embeddings (families that scale them override this)."""
        if self.tp is None:
            return F.embedding(input_ids, self.embed_tokens)
        return self.tp.embed(input_ids, self.embed_tokens)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        """Allocate ``num_slots`` adapter slots of rank ``max_rank`` on every
        projection that takes LoRA; returns (layer, checkpoint projection
        name) -> (its stack, its slice), what ``splitserve.engine.lora.manager``
        writes adapters into."""
        return {(i, name): target for i, layer in enumerate(self.layers)
                for name, target in layer.enable_lora(num_slots, max_rank).items()}

    def adapter_rows(self, name: str, b: torch.Tensor) -> torch.Tensor:
        """An adapter's lora_B [out, r] for projection ``name`` in the row order
        this model holds the projection's weight in: as stored, unless the
        family reorders the weight's rows at load (``HeliumCausalLM``)."""
        return b

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 (tensor parallel: on rank 0, from
        every rank's vocabulary rows; None on the other ranks)."""
        logits = self.scale_logits(ops.linear(hidden, self.lm_head_weight, self.lm_head_bias)).float()
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's elementwise op on the [N, vocab] logits (Gemma's cap,
        Granite's divisor), in the model dtype before the float32 cast, as
        transformers applies it to its lm_head output."""
        return logits

    def weight_slots(self) -> dict[str, ShardSlot]:
        """Every checkpoint tensor this model needs, by its Hugging Face name."""
        slots = {"model.embed_tokens.weight": ShardSlot(self.embed_tokens)}
        if self.embed_positions is not None:
            slots[f"{self.cfg.options.position_table}.weight"] = ShardSlot(self.embed_positions)
        for i, layer in enumerate(self.layers):
            slots.update(layer.weight_slots(f"model.layers.{i}"))
        if self.norm is not None:
            slots.update(norm_slots(self.cfg.options.final_norm_name, self.norm))
        if self.lm_head is not None:
            slots["lm_head.weight"] = ShardSlot(self.lm_head)
        if self.lm_head_bias is not None:
            slots["lm_head.bias"] = ShardSlot(self.lm_head_bias)
        return slots

    def _skipped(self, name: str) -> bool:
        # Tied checkpoints sometimes still store lm_head.weight (a copy of the
        # embeddings); the tie in config.json decides. fp8 checkpoints' static
        # activation scales are not used (activations are scaled per token).
        quant = self.cfg.quantization
        return (name.endswith(_IGNORED_SUFFIXES) or (self.lm_head is None and name == "lm_head.weight")
                or (quant is not None and name in quant.unused))

    def quantize_fp8_(self) -> None:
        """Every decoder layer's projections (attention, MLP, experts) to fp8
        with one scale per output channel, layer by layer, each full-precision
        weight freed as its fp8 copy replaces it. Projections already in fp8
        stay as they are; embeddings, the vocabulary projection, norms and
        MoE routers stay in the model dtype."""
        for layer in self.layers:
            layer.quantize_fp8_()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the model, converting dtype and device.

        Raises CheckpointError naming the tensor for an unexpected name, a
        shape mismatch, a non-float tensor, an fp8 tensor where none is
        expected, a duplicate, or (at the end) the tensors that never arrived."""
        slots = self.weight_slots()
        if self.tp is not None:
            slots = shard_slots(slots, self.tp.plan)
        loaded: set[str] = set()
        arch = self.cfg.architecture
        for name, tensor in weights:
            if self._skipped(name):
                continue
            slot = slots.get(name)
            if slot is None:
                raise CheckpointError(
                    f"unexpected tensor {name!r}: not a weight of {arch} with this config.json "
                    f"({self.cfg.num_layers} layers, tie_word_embeddings={self.cfg.tie_word_embeddings})"
                )
            if name in loaded:
                raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
            slot.load(name, tensor)
            loaded.add(name)
        missing = [name for name in slots if name not in loaded]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"missing tensor(s) for {arch}: {shown}{more}")
        for module in self.modules():  # work done once on loaded weights (MLAttention's)
            if hasattr(module, "finish_load"):
                module.finish_load()
