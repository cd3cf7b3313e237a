"""Model and engine configuration.

``ModelConfig`` is what the engine needs from a Hugging Face ``config.json``
(parsed and checked by ``splitserve.engine.loader``); ``EngineConfig`` is how one engine
instance runs (cache size, batching limits, device, dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.engine.dialects import DIALECTS, dialect_architectures, dialect_model_types
from splitserve.engine.errors import CheckpointError
from splitserve.engine.family_config import (
    DEFAULT_ROPE_THETA,
    FamilyOptions,
    checked_layer_types,
    gemma3_layer_types,
    parse_family_options,
    smollm3_rope_layers,
)
from splitserve.engine.moe_config import MoEConfig, parse_moe
from splitserve.engine.quantization import QuantizationConfig, parse_quantization_config
from splitserve.engine.spec.config import SpeculativeConfig

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# architecture name -> family; families share one implementation with flags.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "Olmo2ForCausalLM": "olmo2",
    "Gemma3ForCausalLM": "gemma3",
    "SmolLM3ForCausalLM": "smollm3",
    "MinistralForCausalLM": "ministral",
    "SeedOssForCausalLM": "seed_oss",
    "HeliumForCausalLM": "helium",
    "Starcoder2ForCausalLM": "starcoder2",
    "PhiForCausalLM": "phi",
    "StableLmForCausalLM": "stablelm",
    "GPTNeoXForCausalLM": "gpt_neox",
    **dialect_architectures(),  # the families of splitserve.engine.dialects
}

# config.json defaults that differ from the Llama-style ones, as each family's
# transformers config class sets them when the key is absent
_DEFAULT_HEAD_DIM = {"seed_oss": 128, "helium": 128}
_DEFAULT_NORM_EPS = {"helium": 1e-8, "starcoder2": 1e-5, "phi": 1e-5, "stablelm": 1e-5, "gpt_neox": 1e-5}
# the families that name their norm epsilon otherwise
_NORM_EPS_KEY = {"starcoder2": "norm_epsilon", "phi": "layer_norm_eps", "stablelm": "layer_norm_eps",
                 "gpt_neox": "layer_norm_eps"}
_DEFAULT_TIED = {"starcoder2": True}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on q and k before RoPE (Qwen3, Gemma 3: per head; OLMo 2: all heads)
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # the window of the layers that have one
    layer_windows: tuple[int, ...] = ()  # per layer: its window, 0 = full attention
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    o_proj_bias: bool = False  # Llama/Qwen3 ``attention_bias`` also covers o_proj
    mlp_bias: bool = False  # Llama ``mlp_bias``: gate/up/down carry a bias
    moe: MoEConfig | None = None  # None: every layer has a dense MLP
    # fp8 checkpoints: the quantization_config, and (once splitserve.engine.loader
    # has read the weight files' headers) which tensors are fp8; None: unquantized
    quantization: QuantizationConfig | None = None
    # what Gemma 1-3, Phi-3, Granite, OLMo 2, SmolLM3, Helium and the LayerNorm families add
    # (splitserve.engine.family_config)
    options: FamilyOptions = field(default_factory=FamilyOptions)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list):  # a bare name would be read letter by letter
            raise CheckpointError(f"{source}: 'architectures' must be a list of class names, "
                                  f"got {type(archs).__name__} {archs!r}")
        if not archs and not cfg.get("model_type"):
            raise CheckpointError(f"{source}: no 'architectures' list, so no model class to "
                                  f"load (a Hugging Face config.json names it)")
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        family = dialect_model_types().get(cfg.get("model_type"), ARCHITECTURES[arch])
        try:
            options = (DIALECTS[family].options(cfg) if family in DIALECTS
                       else parse_family_options(cfg, family))
            if family in DIALECTS:  # read as a Llama-style config.json from here on
                cfg = DIALECTS[family].llama_keys(cfg)
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
            rope_theta, rope_scaling = _rope_params(cfg, family)
            # Which projections carry biases differs by family, as in transformers:
            # Qwen2 always biases q/k/v, Mistral/Mixtral never, Qwen2-MoE per
            # ``qkv_bias`` (on unless written off), Llama/Qwen3(-MoE) follow attention_bias.
            cfg_bias = bool(cfg.get("attention_bias", False))
            qkv_bias = {"qwen2": True, "mistral": False, "mixtral": False, "phi3": False,
                        "qwen2_moe": bool(cfg.get("qkv_bias", True)), "ministral": False,
                        "seed_oss": bool(cfg.get("attention_bias", True)),
                        "starcoder2": bool(cfg.get("use_bias", True)), "phi": True,
                        "stablelm": bool(cfg.get("use_qkv_bias", False)),
                        "gpt_neox": bool(cfg.get("attention_bias", True))}.get(family, cfg_bias)
            if dtype not in DTYPES:
                raise CheckpointError(f"{source}: unsupported torch_dtype {dtype!r}")
            quantization = parse_quantization_config(cfg, source)
            if quantization is not None and family == "helium":
                raise CheckpointError(f"{source}: fp8 {arch} checkpoints are not supported (q/k rows "
                                      "are reordered at load); serve the unquantized checkpoint, with "
                                      "weight_dtype fp8 if wanted")
            if quantization is not None and family == "phi3":
                raise CheckpointError(f"{source}: fp8 {arch} checkpoints (fused qkv_proj / "
                                      "gate_up_proj scales) are not supported; serve the "
                                      "unquantized checkpoint, with weight_dtype fp8 if wanted")
            return cls(
                architecture=arch,
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                # GPT-NeoX has one KV head per query head, whatever else config.json holds
                num_kv_heads=(heads if family == "gpt_neox"
                              else int(cfg.get("num_key_value_heads") or heads)),
                head_dim=_head_dim(cfg, family, hidden, heads),
                rms_norm_eps=float(cfg.get(_NORM_EPS_KEY.get(family, "rms_norm_eps"),
                                           _DEFAULT_NORM_EPS.get(family, 1e-6))),
                rope_theta=rope_theta,
                max_position=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _DEFAULT_TIED.get(family, False))),
                attention_bias=qkv_bias,
                qk_norm=(family in ("qwen3", "qwen3_moe", "olmo2", "gemma3")
                         or (family in DIALECTS and bool(cfg.get("qk_norm", False)))),
                rope_scaling=rope_scaling,
                **_windows(cfg, family, int(cfg["num_hidden_layers"])),
                dtype=dtype,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                o_proj_bias=_o_proj_bias(cfg, family, cfg_bias),
                mlp_bias=_mlp_bias(cfg, family),
                moe=parse_moe(cfg, family, int(cfg["num_hidden_layers"])),
                quantization=quantization,
                options=options,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid value: {e}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_cache_layers(self) -> int:
        """Layers that keep keys and values in the KV cache: every layer, but
        for Gemma 4's KV-sharing layers (the last ones), which read an earlier
        layer's, and a hybrid model's recurrent layers, which keep a state."""
        g = self.options.gemma4
        if g is not None:
            return g.num_cache_layers
        h = self.options.hybrid
        return h.num_cache_layers if h is not None else self.num_layers

    @property
    def kv_planes(self) -> int:
        """The KV cache's planes per layer: keys and values (2), or one for
        multi-head latent attention, whose key and value are the same cached
        latent (``splitserve.engine.models.mla``)."""
        return 1 if self.options.mla is not None else 2

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=kv_dtype).element_size()
        return self.kv_planes * self.num_cache_layers * self.num_kv_heads * self.head_dim * elem


def _head_dim(cfg: dict[str, Any], family: str, hidden: int, heads: int) -> int:
    # StableLM and GPT-NeoX always split hidden_size evenly over the heads; Seed-OSS
    # and Helium default to 128 when config.json has no head_dim key (null: the split)
    if family in ("stablelm", "gpt_neox"):
        return hidden // heads
    if "head_dim" not in cfg and family in _DEFAULT_HEAD_DIM:
        return _DEFAULT_HEAD_DIM[family]
    return int(cfg.get("head_dim") or hidden // heads)


def _o_proj_bias(cfg: dict[str, Any], family: str, cfg_bias: bool) -> bool:
    if family == "seed_oss":  # its own switch for the output projection
        return bool(cfg.get("attention_out_bias", False))
    if family == "starcoder2":  # use_bias: every projection
        return bool(cfg.get("use_bias", True))
    if family == "phi":  # the attention's ``dense`` always has one
        return True
    if family == "gpt_neox":  # ``dense`` per attention_bias, on by default
        return bool(cfg.get("attention_bias", True))
    if family in DIALECTS:
        return bool(cfg.get("attention_out_bias", cfg_bias))
    return family in _O_PROJ_BIAS_FAMILIES and cfg_bias


def _mlp_bias(cfg: dict[str, Any], family: str) -> bool:
    if family == "starcoder2":
        return bool(cfg.get("use_bias", True))
    if family in ("phi", "gpt_neox"):  # the ungated MLP always has them
        return True
    return (family in ("llama", "granite", "smollm3", "seed_oss", "helium") or family in DIALECTS) \
        and bool(cfg.get("mlp_bias", False))


# Families whose ``attention_bias`` covers o_proj as well as q/k/v.
_O_PROJ_BIAS_FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "granite", "olmo2",
                         "smollm3")

# Families whose window, once set, covers every layer: Mistral, Mixtral and
# Phi-3 with no switch, Qwen3-MoE behind ``use_sliding_window``.
_EVERY_LAYER_WINDOWED = ("mistral", "mixtral", "phi3", "qwen3_moe", "starcoder2")
# Families with no sliding window at all.
_UNWINDOWED = ("llama", "gemma", "granite", "olmo2", "seed_oss", "helium", "phi", "stablelm", "gpt_neox")


def _windows(cfg: dict[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_windows`` as transformers applies them.

    Mistral and Mixtral have no switch: a window set applies to every layer.
    Phi-3 likewise; Gemma 2 to the layers ``layer_types`` marks (by default
    every other layer from layer 0), Gemma 3 likewise (by default all but
    every ``sliding_window_pattern``-th; a window of 4096 when config.json
    names none), Gemma has none. SmolLM3 behind ``use_sliding_window``, on
    the layers ``layer_types`` marks (by default its layers without RoPE).
    The Qwen families apply it only with ``use_sliding_window``: Qwen3-MoE to
    every layer, Qwen2/Qwen3/Qwen2-MoE to the layers ``layer_types`` marks
    ``sliding_attention`` (older configs: layers from ``max_window_layers``
    on). Llama has none."""
    window = cfg.get("sliding_window", 4096 if family in ("gemma3", "ministral") else None)
    if family == "gemma3" and window is None and "sliding_attention" in gemma3_layer_types(cfg):
        # transformers cannot build the sliding layers' mask without one
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    if family == "ministral":
        return _ministral_windows(cfg, window, num_layers)
    switched = (family in ("mistral", "mixtral", "phi3", "gemma2", "gemma3", "starcoder2")
                or cfg.get("use_sliding_window"))
    if family in _UNWINDOWED or not window or not switched:
        return {"sliding_window": None, "layer_windows": (0,) * num_layers}
    window = int(window)
    if window <= 0:
        raise ValueError(f"sliding_window must be positive, got {window}")
    if family in _EVERY_LAYER_WINDOWED:
        return {"sliding_window": window, "layer_windows": (window,) * num_layers}
    types = cfg.get("layer_types")
    if types is None and family == "gemma2":  # every other layer, from layer 0
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if types is None and family == "gemma3":
        types = gemma3_layer_types(cfg)
    if types is None and family == "smollm3":  # the layers without RoPE
        types = ["full_attention" if rope else "sliding_attention" for rope in smollm3_rope_layers(cfg)]
    if types is None:
        first = int(cfg.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return {"sliding_window": window if any(windows) else None, "layer_windows": windows}


def _ministral_windows(cfg: dict[str, Any], window: Any, num_layers: int) -> dict[str, Any]:
    """Ministral: ``layer_types`` per layer; without it every layer slides
    when a window is set, none when it is null (as its config class fills it)."""
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * num_layers
    types = checked_layer_types(types, num_layers, "ministral")
    if "sliding_attention" in types and window is None:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    if window is not None and int(window) <= 0:
        raise ValueError(f"sliding_window must be positive, got {window}")
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return {"sliding_window": int(window) if any(windows) else None, "layer_windows": windows}


def _rope_params(cfg: dict[str, Any], family: str = "") -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config layout.

    transformers < 5 writes ``rope_theta`` and ``rope_scaling`` at top level;
    transformers >= 5 writes one ``rope_parameters`` dict holding both, with
    ``rope_type: "default"`` meaning no scaling. Scaling dicts are returned as
    written (``type`` or ``rope_type``); splitserve.engine.models.rope reads either.
    Gemma 3's ``rope_parameters`` has one dict per layer type: this is the
    full-attention layers' (``FamilyOptions.local_rope_theta`` the sliding ones')."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {params!r}")
    if family == "gemma3" and params is not None:
        params = _gemma3_full_rope(cfg)
    # both present: the dict's, as transformers >= 5 standardises them
    theta = ((params or {}).get("rope_theta") or cfg.get("rope_theta")
             or (cfg.get("rotary_emb_base") if family == "gpt_neox" else None)  # its older name
             or DEFAULT_ROPE_THETA.get(family, 10000.0))
    kind = (params or {}).get("rope_type") or (params or {}).get("type") or "default"
    scaling = None if kind == "default" else dict(params)
    if kind in ("llama3", "yarn", "longrope"):
        # The pretraining length, where transformers finds it: a top-level
        # original_max_position_embeddings wins over the dict's (Phi-3 style
        # configs); with neither, max_position_embeddings.
        top = cfg.get("original_max_position_embeddings")
        if top is not None:
            scaling["original_max_position_embeddings"] = top
        elif scaling.get("original_max_position_embeddings") is None and \
                cfg.get("max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    # Rotary over part of each head: kept with the scaling (a top-level key in
    # transformers < 5) so splitserve.engine.models.rope refuses it at load.
    partial = (params or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        scaling = {**(scaling or {"rope_type": "default"}), "partial_rotary_factor": float(partial)}
    return float(theta), scaling


def _gemma3_full_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 nests rope_parameters by layer type; the older
    # rope_scaling is the full-attention layers' alone
    nested = cfg.get("rope_parameters")
    if not nested:
        return cfg.get("rope_scaling") or {}
    if not {"full_attention", "sliding_attention"} & nested.keys():
        raise ValueError("Gemma 3's rope_parameters must be nested by layer type "
                         "(full_attention, sliding_attention), as transformers writes them")
    return nested.get("full_attention") or {}


@dataclass
class EngineConfig:
    model: str  # checkpoint directory
    model_id: str | None = None  # served name; defaults to the directory name
    dtype: str | None = None  # None: the checkpoint's dtype (bf16 -> fp32 on CPU)
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.5
    kv_cache_dtype: str = "auto"  # auto (= model dtype) | fp8
    # auto: the checkpoint's weights as stored (fp8 checkpoints stay fp8);
    # fp8: an unquantized checkpoint's projections quantized at load, per channel
    weight_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position
    enable_prefix_caching: bool = True
    # hybrid models: recurrent-state checkpoints kept for prefix-cache hits
    # (splitserve.engine.state_checkpoints); None: max_num_seqs; 0: no prefix caching
    state_checkpoints: int | None = None
    enforce_eager: bool = False  # CUDA: skip capturing decode steps as CUDA graphs
    # LoRA adapters: device slots (0: none served), their largest rank, and
    # how many adapters host memory keeps (None: 4 per slot)
    max_loras: int = 0
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # ranks the model is split over (splitserve.engine.parallel); rank r on the
    # r-th GPU from ``device`` on, or all on the CPU
    tensor_parallel_size: int = 1
    seed: int = 0
    # speculative decoding (splitserve.engine.spec); None: off
    speculative: SpeculativeConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.state_checkpoints is not None and self.state_checkpoints < 0:
            raise ValueError(f"state_checkpoints must be >= 0, got {self.state_checkpoints}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.max_loras < 0 or self.max_lora_rank <= 0:
            raise ValueError(f"max_loras must be >= 0 and max_lora_rank positive, got "
                             f"{self.max_loras} and {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras})")
        if self.weight_dtype not in ("auto", "fp8"):
            raise ValueError(f"weight_dtype must be 'auto' or 'fp8', got {self.weight_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
