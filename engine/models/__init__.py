"""Model families by name; ``build_model`` picks the implementation for a config."""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.axk1 import AXK1CausalLM
from splitserve.engine.models.bloom import BloomCausalLM
from splitserve.engine.models.cohere import CohereCausalLM
from splitserve.engine.models.cohere2 import Cohere2CausalLM
from splitserve.engine.models.cohere2_moe import Cohere2MoeCausalLM
from splitserve.engine.models.deepseek import DeepseekCausalLM
from splitserve.engine.models.ernie4_5 import Ernie4_5CausalLM
from splitserve.engine.models.ernie4_5_moe import Ernie4_5MoeCausalLM
from splitserve.engine.models.exaone import ExaoneCausalLM
from splitserve.engine.models.exaone4 import Exaone4CausalLM
from splitserve.engine.models.exaone_moe import ExaoneMoeCausalLM
from splitserve.engine.models.vaultgemma import VaultGemmaCausalLM
from splitserve.engine.models.falcon import FalconCausalLM
from splitserve.engine.models.flex_olmo import FlexOlmoCausalLM
from splitserve.engine.models.gemma import GemmaCausalLM
from splitserve.engine.models.gemma3 import Gemma3CausalLM
from splitserve.engine.models.gemma4 import Gemma4CausalLM
from splitserve.engine.models.glm import GlmCausalLM
from splitserve.engine.models.glm4 import Glm4CausalLM
from splitserve.engine.models.glm4_moe import Glm4MoeCausalLM
from splitserve.engine.models.gpt2 import GPT2CausalLM
from splitserve.engine.models.gpt_bigcode import GPTBigCodeCausalLM
from splitserve.engine.models.gpt_neo import GPTNeoCausalLM
from splitserve.engine.models.gpt_neox import GPTNeoXCausalLM
from splitserve.engine.models.gpt_oss import GptOssCausalLM
from splitserve.engine.models.gptj import GPTJCausalLM
from splitserve.engine.models.granite import GraniteCausalLM
from splitserve.engine.models.granitemoe import GraniteMoeCausalLM
from splitserve.engine.models.helium import HeliumCausalLM
from splitserve.engine.models.hunyuan import HunYuanDenseCausalLM
from splitserve.engine.models.hunyuan_moe import HunYuanMoeCausalLM
from splitserve.engine.models.hy_v3 import HYV3CausalLM
from splitserve.engine.models.longcat_flash import LongcatFlashCausalLM
from splitserve.engine.models.qwen3_next import Qwen3NextForCausalLM
from splitserve.engine.models.kimi_linear import KimiLinearForCausalLM
from splitserve.engine.models.qwen3_5 import Qwen3_5ForCausalLM
from splitserve.engine.models.olmo_hybrid import OlmoHybridCausalLM
from splitserve.engine.models.lfm2 import Lfm2ForCausalLM
from splitserve.engine.models.lfm2_moe import Lfm2MoeForCausalLM
from splitserve.engine.models.lfm3 import Lfm3ForCausalLM
from splitserve.engine.models.mamba import MambaCausalLM
from splitserve.engine.models.jamba import JambaCausalLM
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.llama4 import Llama4CausalLM
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.minimax_m2 import MiniMaxM2CausalLM
from splitserve.engine.models.ministral3 import Ministral3CausalLM
from splitserve.engine.models.mpt import MptCausalLM
from splitserve.engine.models.nemotron import NemotronCausalLM
from splitserve.engine.models.olmo2 import Olmo2CausalLM
from splitserve.engine.models.olmo3 import Olmo3CausalLM
from splitserve.engine.models.opt import OPTCausalLM
from splitserve.engine.models.phi3 import Phi3CausalLM
from splitserve.engine.models.smollm3 import SmolLM3CausalLM
from splitserve.engine.models.apertus import ApertusCausalLM
from splitserve.engine.models.dbrx import DbrxCausalLM
from splitserve.engine.models.phimoe import PhimoeCausalLM
from splitserve.engine.models.codegen import CodeGenCausalLM
from splitserve.engine.models.granite_swa import GraniteSwaCausalLM
from splitserve.engine.models.granitemoe_swa import GraniteMoeSwaCausalLM
from splitserve.engine.models.hyperclovax import HyperCLOVAXCausalLM
from splitserve.engine.models.mimo_v2_flash import MiMoV2FlashCausalLM
from splitserve.engine.models.kolibri1 import Kolibri1CausalLM
from splitserve.engine.models.minicpm5_moe import MiniCPM5MoeCausalLM
from splitserve.engine.models.youtu import YoutuCausalLM
from splitserve.engine.models.nanochat import NanoChatCausalLM
from splitserve.engine.models.afmoe import AfmoeCausalLM
from splitserve.engine.models.persimmon import PersimmonCausalLM
from splitserve.engine.models.xglm import XGLMCausalLM
from splitserve.engine.models.openai_gpt import OpenAIGPTCausalLM
from splitserve.engine.models.biogpt import BioGptCausalLM
from splitserve.engine.models.sarvam_moe import SarvamMoeCausalLM
from splitserve.engine.models.flint import FlintCausalLM
from splitserve.engine.models.granitemoehybrid import GraniteMoeHybridCausalLM
from splitserve.engine.models.bamba import BambaCausalLM
from splitserve.engine.models.falcon_h1 import FalconH1CausalLM
from splitserve.engine.models.zamba2 import Zamba2CausalLM
from splitserve.engine.models.nemotron_h import NemotronHCausalLM
from splitserve.engine.models.recurrent_gemma import RecurrentGemmaForCausalLM
from splitserve.engine.models.minimax import MiniMaxForCausalLM
from splitserve.engine.models.bailing_hybrid import BailingHybridForCausalLM
from splitserve.engine.parallel.group import TPGroup

# family -> implementation; the dense families share one decoder with flags,
# the mixture-of-experts ones add sparse MLP layers to it, Gemma's scale its
# embeddings and norms and Gemma 2's add norms and soft caps, Phi-3's split
# fused checkpoint tensors, Granite's scale embeddings, residual branches and
# logits, OLMo 2's norm each block's output instead of its input, Gemma 3's
# add per-head q/k norms and a second RoPE base, SmolLM3's skip RoPE in some layers,
# Helium's reorder q/k rows for its interleaved RoPE. Ministral and Seed-OSS differ
# from Llama in config.json only; StarCoder2, Phi and StableLM take the dense decoder
# with LayerNorm, the plain MLP and the parallel residual (FamilyOptions), GPT-NeoX
# too, its checkpoint names mapped at load; Falcon and GPT-J likewise, Falcon's
# fused q/k/v split by KV group, GPT-J's q/k rows reordered for its interleaved RoPE.
# GPT-2 and OPT take LayerNorm and the plain MLP with a learned position table in
# place of RoPE, their checkpoint names mapped at load.
# Cohere's take the parallel residual with float32 LayerNorms, Helium's q/k
# reordering and scaled logits; OLMo's the dense decoder with parameterless
# LayerNorms and clamped q/k/v (FamilyOptions). GLM's split Phi-3's fused
# gate_up_proj and reorder the rotated part of each q/k head's rows.
MODEL_FAMILIES: dict[str, type[CausalLM]] = {
    "llama": CausalLM,
    "mistral": CausalLM,
    "qwen2": CausalLM,
    "qwen3": CausalLM,
    "mixtral": MoECausalLM,
    "qwen2_moe": MoECausalLM,
    "qwen3_moe": MoECausalLM,
    "gemma": GemmaCausalLM,
    "gemma2": GemmaCausalLM,
    "phi3": Phi3CausalLM,
    "granite": GraniteCausalLM,
    "olmo2": Olmo2CausalLM,
    "gemma3": Gemma3CausalLM,
    "smollm3": SmolLM3CausalLM,
    "ministral": CausalLM,
    "seed_oss": CausalLM,
    "helium": HeliumCausalLM,
    "starcoder2": CausalLM,
    "phi": CausalLM,
    "stablelm": CausalLM,
    "gpt_neox": GPTNeoXCausalLM,
    "gpt2": GPT2CausalLM,
    "opt": OPTCausalLM,
    "falcon": FalconCausalLM,
    "gptj": GPTJCausalLM,
    # OLMoE: the MoE decoder with OLMo 2's all-head q/k norms and clip_qkv (FamilyOptions);
    # GraniteMoE(Shared): Granite's scalars, fused experts split at load
    "olmoe": MoECausalLM,
    "granitemoe": GraniteMoeCausalLM,
    "granitemoeshared": GraniteMoeCausalLM,
    "cohere": CohereCausalLM,
    "olmo": CausalLM,
    "glm": GlmCausalLM,
    # GLM-4.5 and dots.llm1: the MoE decoder with the grouped sigmoid router and ungated
    # shared experts (MoEConfig); GLM-4.5's multi-token-prediction layers skipped at load
    "glm4_moe": Glm4MoeCausalLM,
    "dots1": MoECausalLM,
    # GLM-4: GLM with Gemma 2's sandwich norms; Cohere 2: Cohere with windows on some layers
    # and no RoPE on the others; Nemotron: LayerNorms scaling by 1 + weight, the plain
    # relu2 MLP and partial RoPE; Arcee: Llama with the plain relu2 MLP (FamilyOptions)
    "glm4": Glm4CausalLM,
    "cohere2": Cohere2CausalLM,
    "nemotron": NemotronCausalLM,
    "arcee": CausalLM,
    # GPT-BigCode, GPT-Neo: GPT-2's learned positions and names, nn.Linear weights; GPT-BigCode's
    # c_attn split by KV head (multi-query), GPT-Neo's windowed layers unscaled
    "gpt_bigcode": GPTBigCodeCausalLM,
    "gpt_neo": GPTNeoCausalLM,
    # OLMo 3: OLMo 2's with windows and the sliding layers' own RoPE table; EXAONE 4: OLMo 2's
    # post-norms with per-head q/k norms, windows and NoPE full-attention layers; ERNIE 4.5:
    # Helium's q/k reordering; HunYuan dense: q/k norms after RoPE, renamed at load
    "olmo3": Olmo3CausalLM,
    "exaone4": Exaone4CausalLM,
    "ernie4_5": Ernie4_5CausalLM,
    "hunyuan_v1_dense": HunYuanDenseCausalLM,
    # InternLM3: Llama, its biases read from qkv_bias / bias
    "internlm3": CausalLM,
    # Apertus: per-head q/k norms and the ungated xIELU MLP, norms renamed at load
    "apertus": ApertusCausalLM,
    # PhiMoE: LayerNorms, biased attention and LM head, the sparsemixer router, its own LongRoPE table
    "phimoe": PhimoeCausalLM,
    # DBRX: float32 LayerNorms, clamped q/k/v, fused Wqkv and experts split at load, p-normed weights
    "dbrx": DbrxCausalLM,
    # gpt-oss: attention sinks, windows on alternate layers, and experts with biases and a
    # clamped SwiGLU, their fused gate/up de-interleaved at load
    "gpt_oss": GptOssCausalLM,
    # Llama 4: Helium's q/k reordering, SmolLM3's NoPE layers with query temperature, q/k
    # L2 norms after RoPE, experts scaled at their input beside a shared expert
    "llama4": Llama4CausalLM,
    # DeepSeek V2 / V3: GLM-4.5's MoE decoder with multi-head latent attention over a cache of
    # the latent (one KV head, one plane); V2's softmax router
    "deepseek_v2": DeepseekCausalLM,
    "deepseek_v3": DeepseekCausalLM,
    # Bloom, MPT: ALiBi in place of RoPE (FamilyOptions.alibi); Bloom's Falcon-named tensors and
    # its norm on the embeddings, MPT's fused Wqkv split at load
    "bloom": BloomCausalLM,
    "mpt": MptCausalLM,
    # FlexOlmo: OLMo 2's post-norm layers around OLMoE's experts
    "flex_olmo": FlexOlmoCausalLM,
    # MiniMax-M2: the MoE decoder with GLM-4.5's sigmoid router as one group, all-head q/k
    # norms and partial RoPE; the router's correction bias renamed at load
    "minimax_m2": MiniMaxM2CausalLM,
    # ERNIE 4.5 MoE: ERNIE 4.5's q/k reordering with a correction-biased softmax router and
    # ungated shared experts
    "ernie4_5_moe": Ernie4_5MoeCausalLM,
    # HunYuan MoE: HunYuan dense's q/k norms after RoPE with a float32 softmax router and an
    # ungated shared MLP in every layer, renamed at load
    "hunyuan_v1_moe": HunYuanMoeCausalLM,
    # EXAONE 3.0 / 3.5: Llama under its own tensor names, mapped at load
    "exaone": ExaoneCausalLM,
    # VaultGemma: Gemma 2's scales and soft caps on Gemma's layers, its pre-MLP norm renamed at load
    "vaultgemma": VaultGemmaCausalLM,
    # Granite SWA, GraniteMoeSWA: Granite's (GraniteMoeShared's) layers with sinks, windows per
    # layer_types and a RoPE base per layer; GraniteMoeSWA's transformers 5 expert names mapped
    "granite_swa": GraniteSwaCausalLM,
    "granitemoe_swa": GraniteMoeSwaCausalLM,
    # CodeGen: GPT-J's model with its fused, 4-shard qkv_proj split at load
    "codegen": CodeGenCausalLM,
    # Ministral 3: Mistral with its queries scaled by position (Llama 4's form) in every layer
    "ministral3": Ministral3CausalLM,
    # CWM: Llama with windows on the layers layer_types marks; IQuest-Coder: Llama
    "cwm": CausalLM,
    "iquestcoder": CausalLM,
    # K-EXAONE: the MoE decoder with EXAONE 4's per-head q/k norms, windows and NoPE
    # full-attention layers, DeepSeek-V3's router; its MTP tensors skipped at load
    "exaone_moe": ExaoneMoeCausalLM,
    # Cohere 2 MoE: Cohere 2's layers with top-k routed experts and averaged shared experts
    "cohere2_moe": Cohere2MoeCausalLM,
    # Solar Open: GLM-4.5's grouped sigmoid router and shared experts in every layer, full RoPE,
    # no q/k norms (FamilyOptions)
    "solar_open": MoECausalLM,
    # Jais 2: Llama with LayerNorms and the plain relu2 MLP (FamilyOptions)
    "jais2": CausalLM,
    # HyperCLOVA X: Granite's scalars, logits multiplied, Gemma 2's sandwich norms renamed
    "hyperclovax": HyperCLOVAXCausalLM,
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and GLM-4.5's experts, dense layers by
    # mlp_layer_types
    "glm4_moe_lite": DeepseekCausalLM,
    # Youtu: the dense decoder with DeepSeek's latent attention in every layer
    "youtu": YoutuCausalLM,
    # Gemma 4: Gemma 3's sandwich layers with per-layer head shapes (zero-padded into one
    # cache width), shared KV caches, per-layer input embeddings, a scalar per layer and
    # experts beside the MLP
    "gemma4": Gemma4CausalLM,
    # MiMo-V2-Flash: GLM-4.5's router without shared experts, sliding layers with twice the KV
    # heads and sinks, values narrower than the keys (zero-padded in the cache) and scaled, a
    # RoPE base per layer type
    "mimo_v2_flash": MiMoV2FlashCausalLM,
    # A.X K1: DeepSeek-V3 with an RMSNorm on each sparse layer's experts' output
    "axk1": AXK1CausalLM,
    # Kolibri: EXAONE 4's attention in GLM-4's sandwich layers, experts in every layer ranked
    # by logit plus a correction bias, weighted by sigmoid; renamed at load
    "kolibri1": Kolibri1CausalLM,
    # MiniCPM5-MoE: DeepSeek-V3's router and shared experts with Llama's attention, each head's
    # output gated by a sigmoid (its q_proj rows split at load)
    "minicpm5_moe": MiniCPM5MoeCausalLM,
    # nanochat: weightless norms (one on the embeddings), Llama 4's q/k norms after a RoPE
    # turning the other way (q/k rows negated at load), the plain relu2 MLP, capped logits
    "nanochat": NanoChatCausalLM,
    # AFMoE: Gemma 2's sandwich norms around gated attention (NoPE full layers) and GLM-4.5's
    # sigmoid router as one group with an ungated shared MLP, renamed at load
    "afmoe": AfmoeCausalLM,
    # Persimmon: GPT-NeoX's fused query_key_value with shared q/k LayerNorms, partial RoPE
    # and the plain relu2 MLP
    "persimmon": PersimmonCausalLM,
    # XGLM: OPT's model with scaled token embeddings and a fixed sinusoidal position table
    "xglm": XGLMCausalLM,
    # OpenAI GPT: GPT-2's Conv1D checkpoints in OPT-350m's post-norm layers, no final norm
    "openai-gpt": OpenAIGPTCausalLM,
    # BioGPT: OPT's model with scaled token embeddings, renamed at load
    "biogpt": BioGptCausalLM,
    # Sarvam MoE, Param2 MoE: GLM-4.5's decoder under their own names, fused q/k/v split at load
    "sarvam_moe": SarvamMoeCausalLM,
    "param2moe": SarvamMoeCausalLM,
    # Sarvam MLA: DeepSeek-V3 under its own config names
    "sarvam_mla": DeepseekCausalLM,
    # Flint: the MoE decoder with gpt-oss's sinks, NoPE full-attention layers and a sigmoid router
    "flint": FlintCausalLM,
    # Hy3: the MoE decoder with per-head q/k norms, a single-group sigmoid router and an
    # ungated shared MLP, dense layers by mlp_layer_types; its router renamed at load
    "hy_v3": HYV3CausalLM,
    # LongCat-Flash: two latent-attention sublayers per layer, each a decoder layer, the
    # first feeding shortcut experts (with zero-computation ones) whose output the second adds
    "longcat_flash": LongcatFlashCausalLM,
    # Qwen3-Next: Gated DeltaNet layers (a recurrent state per sequence) beside gated
    # attention layers, Qwen2-MoE's sparse MLP
    "qwen3_next": Qwen3NextForCausalLM,
    # Kimi Linear: Kimi Delta Attention layers (a recurrent state per sequence) beside latent
    # attention layers without RoPE, DeepSeek-V3's experts
    "kimi_linear": KimiLinearForCausalLM,
    # Qwen3.5: Qwen3-Next's layers, the Gated DeltaNet's projections stored apart, dense MLPs;
    # its multimodal wrapper's text model
    "qwen3_5": Qwen3_5ForCausalLM,
    # Qwen3.5-MoE: the same, Qwen2-MoE's sparse MLP (renormalised top-k) in every layer
    "qwen3_5_moe": Qwen3_5ForCausalLM,
    # OLMo Hybrid: pre-norm Gated DeltaNet layers beside OLMo 3's post-norm attention layers
    "olmo_hybrid": OlmoHybridCausalLM,
    # LFM2: gated short-convolution layers (a state per sequence) beside attention layers
    "lfm2": Lfm2ForCausalLM,
    # LFM2-MoE: LFM2 with sigmoid-routed experts (a per-expert bias for choosing) past its dense layers
    "lfm2_moe": Lfm2MoeForCausalLM,
    # LFM3: LFM2 with full and sliding attention layers (RoPE per layer type), gated heads and
    # sandwich norms
    "lfm3": Lfm3ForCausalLM,
    # Granite 4.0-H: Mamba-2 layers beside Granite attention layers (RoPE or none), the
    # experts and a shared MLP (or the shared MLP alone), Granite's scalars throughout
    "granitemoehybrid": GraniteMoeHybridCausalLM,
    # Bamba: Mamba-2 layers beside Llama attention layers with partial RoPE, a SwiGLU
    # feed_forward in every layer
    "bamba": BambaCausalLM,
    # Nemotron-H: one Mamba-2 or attention block (no positional encoding) and the relu2 MLP
    # block after it per layer, renamed from the checkpoint's blocks at load
    "nemotron_h": NemotronHCausalLM,
    # RecurrentGemma: Griffin's recurrent blocks (convolution and RG-LRU) beside local multi-query
    # attention layers, Gemma's norms, embedding scale and logit soft-cap
    "recurrent_gemma": RecurrentGemmaForCausalLM,
    # Mamba, Falcon-Mamba: every layer a Mamba-1 mixer (a recurrent state per sequence), no
    # attention (a KV cache of no layer), the residual stream in float32
    "mamba": MambaCausalLM,
    "falcon_mamba": MambaCausalLM,
    # Jamba: Mamba-1 layers beside attention layers without RoPE, experts on some layers
    "jamba": JambaCausalLM,
    # MiniMax-Text-01: lightning (linear, decaying) attention layers beside Llama attention
    # layers, Mixtral's experts in every layer, each residual the block's normed input
    "minimax": MiniMaxForCausalLM,
    # Bailing hybrid (Ling 3): Kimi Delta Attention with Bailing's gates beside gated latent
    # attention, DeepSeek-V3's experts; original checkpoint names mapped at load
    "bailing_hybrid": BailingHybridForCausalLM,
    # Falcon-H1: Mamba-2 and Llama attention side by side in every layer, a SwiGLU
    # feed_forward, its multipliers throughout
    "falcon_h1": FalconH1CausalLM,
    # Zamba2: Mamba-2 layers, the hybrid ones after a use of a shared attention + MLP block
    # (per-use adapters and KV cache slices) on their input beside the original embeddings
    "zamba2": Zamba2CausalLM,
    # Mamba-2 (Codestral Mamba): Mamba's blocks with Mamba-2 mixers, no attention layer
    "mamba2": MambaCausalLM,
}


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                tp: TPGroup | None = None) -> CausalLM:
    """An unloaded model (parameters allocated, not initialised) for ``cfg``;
    with ``tp``, that rank's shard of it."""
    impl = MODEL_FAMILIES.get(cfg.family)
    if impl is None:
        raise CheckpointError(
            f"model family {cfg.family!r} ({cfg.architecture}) has no implementation; "
            f"supported: {', '.join(MODEL_FAMILIES)}"
        )
    if tp is None:
        return impl(cfg, dtype, torch.device(device)).eval()
    model = impl(tp.plan.local_config(), dtype, torch.device(device)).eval()
    model.attach_tensor_parallel(tp)
    return model


__all__ = ["Qwen3NextForCausalLM", "CausalLM", "CohereCausalLM", "GPT2CausalLM", "GPTNeoXCausalLM", "Gemma3CausalLM", "GemmaCausalLM",
           "GlmCausalLM", "Glm4MoeCausalLM", "GraniteCausalLM", "HeliumCausalLM",
           "MODEL_FAMILIES",
           "MoECausalLM", "OPTCausalLM", "Olmo2CausalLM", "Phi3CausalLM", "SmolLM3CausalLM", "build_model",
           "FalconCausalLM", "GPTJCausalLM", "Glm4CausalLM", "Cohere2CausalLM", "NemotronCausalLM",
           "GPTBigCodeCausalLM", "GPTNeoCausalLM", "Olmo3CausalLM",
           "Exaone4CausalLM", "Ernie4_5CausalLM", "HunYuanDenseCausalLM",
           "ApertusCausalLM", "PhimoeCausalLM", "DbrxCausalLM", "GptOssCausalLM", "Llama4CausalLM",
           "DeepseekCausalLM", "BloomCausalLM", "MptCausalLM", "FlexOlmoCausalLM",
           "MiniMaxM2CausalLM", "ExaoneCausalLM", "VaultGemmaCausalLM",
           "GraniteSwaCausalLM", "GraniteMoeSwaCausalLM", "CodeGenCausalLM", "Ministral3CausalLM",
           "HyperCLOVAXCausalLM", "YoutuCausalLM", "Gemma4CausalLM",
           "AXK1CausalLM", "Kolibri1CausalLM", "MiniCPM5MoeCausalLM", "KimiLinearForCausalLM", "MambaCausalLM", "JambaCausalLM"]
