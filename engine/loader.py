"""Open a local Hugging Face checkpoint directory and load its model.

``load_checkpoint`` reads and checks the small files (config.json,
generation_config.json, the safetensors index) and names the weight files;
``load_model`` builds the model and streams tensors into it one at a time
from safetensors (memory-mapped), so peak host memory is one tensor, not a
second copy of the model. FP8 checkpoints (``splitserve.engine.quantization``)
keep their projections in fp8. Every problem surfaces as a ``CheckpointError``
whose message names the directory and the file or tensor at fault.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from splitserve.engine.checkpoint_files import read_json
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models import CausalLM, build_model
from splitserve.engine.models.rope import inv_freq_and_scale
from splitserve.engine.parallel.group import TPGroup
from splitserve.engine.quantization import scan_fp8_weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_config: ModelConfig
    generation_config: dict[str, Any]
    has_tokenizer: bool  # tokenizer.json present (prefill/decode workers need none)
    weight_files: tuple[Path, ...]  # safetensors files, in load order
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # raw config.json

    @property
    def name(self) -> str:
        return self.path.name


def _weight_files(root: Path) -> tuple[Path, ...]:
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' naming the shards")
        for shard in weight_map.values():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name in {root}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (root / shard).is_file():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is not in {root}")
        return tuple(root / s for s in shards)
    if (root / SINGLE_FILE).is_file():
        return (root / SINGLE_FILE,)
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f"; found {', '.join(others)}: convert it to safetensors" if others else ""
    raise CheckpointError(f"{root}: no weights file ({SINGLE_FILE} or {INDEX_FILE}){hint}")


def load_checkpoint(path: str | Path, require_tokenizer: bool = False) -> Checkpoint:
    """Read and check a checkpoint directory's metadata; loads no weights."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    config = read_json(root / "config.json", "model config")
    model_config = ModelConfig.from_hf(config, source=str(root / "config.json"))
    try:
        inv_freq_and_scale(model_config)  # unsupported RoPE scaling fails here, not at load
    except CheckpointError as e:
        raise CheckpointError(f"{root}/{e}") from None
    weight_files = _weight_files(root)
    if model_config.quantization is not None:  # fp8: which tensors, with which scales
        try:
            quant = scan_fp8_weights(weight_files, model_config.quantization)
        except CheckpointError as e:
            msg = str(e)
            raise CheckpointError(msg if msg.startswith(str(root)) else f"{root}: {msg}") from None
        model_config = dataclasses.replace(model_config, quantization=quant)
    generation_config = read_json(root / "generation_config.json", "generation config",
                                  required=False)
    has_tokenizer = (root / TOKENIZER_FILE).is_file()
    if require_tokenizer and not has_tokenizer:
        raise CheckpointError(f"{root}: {TOKENIZER_FILE} not found (needed to tokenize prompts)")
    return Checkpoint(
        path=root,
        model_config=model_config,
        generation_config=generation_config,
        has_tokenizer=has_tokenizer,
        weight_files=weight_files,
        config=config,
    )


class _TensorStream:
    """(name, tensor) from each weight file in turn; remembers which file it is in."""

    def __init__(self, files: tuple[Path, ...]):
        self.files = files
        self.current: Path | None = None  # None once every file has been read

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            self.current = path
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                self.current = None  # the message below already names the file
                raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
        self.current = None


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    weight_dtype: str = "auto",
    tp: TPGroup | None = None,
) -> CausalLM:
    """Build the checkpoint's model on ``device`` in ``dtype`` (default: the
    checkpoint's own dtype) and fill it with the checkpoint's weights.

    fp8 checkpoints load their projections in fp8 with their scales (the
    rest in ``dtype``). ``weight_dtype="fp8"`` quantizes an unquantized
    checkpoint's projections per output channel once loaded
    (``CausalLM.quantize_fp8_``): the full-precision model exists until
    then, and each layer's weights are replaced by fp8 ones in turn. ``tp``:
    load this tensor-parallel rank's shard (``splitserve.engine.parallel``)."""
    if weight_dtype not in ("auto", "fp8"):
        raise ValueError(f"weight_dtype must be 'auto' or 'fp8', got {weight_dtype!r}")
    dtype = dtype or checkpoint.model_config.torch_dtype
    model = build_model(checkpoint.model_config, dtype, device, tp)
    stream = _TensorStream(checkpoint.weight_files)
    try:
        model.load_weights(stream)
    except CheckpointError as e:
        if stream.current is None:  # unreadable file, or tensors missing after all files
            if str(e).startswith(str(checkpoint.path)):
                raise
            raise CheckpointError(f"{checkpoint.path}: {e}") from None
        raise CheckpointError(f"{stream.current}: {e}") from None
    if weight_dtype == "fp8":
        model.quantize_fp8_()
    return model
