"""FP8 weights split across tensor-parallel ranks (gloo on CPU).

- fp8 checkpoints (HF block / per-tensor, compressed-tensors per-channel /
  blocks; dense and MoE): each rank loads its rows or columns of every fp8
  weight with the scale groups they cover (``engine.parallel.scale_shards``),
  and the engine at TP 2 gives the greedy tokens of transformers running
  the same weights dequantized, as at TP 1 (test_fp8_engine).
- A rank boundary inside a scale group is refused before any rank starts,
  naming the tensor.
- ``weight_dtype: fp8`` quantizes each rank's shard at load (row-parallel
  projections per rank's columns): the tokens of TP 1's quantized model.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.errors import CheckpointError
from splitserve.engine.loader import load_checkpoint
from splitserve.engine.models.layers import scale_slot
from splitserve.engine.parallel.scale_shards import RankScale
from splitserve.engine.parallel.plan import TensorParallelConfigError, check
from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.fixtures.fp8_checkpoints import write_dequantized_checkpoint, write_fp8_checkpoint
from tests.unit.test_fp8_engine import GREEDY, PROMPTS
from tests.unit.test_tp_engine import engines, make  # noqa: F401  (fixture)

CASES = [
    ("llama_bf16", "fp8_block", {}),  # one 128-block covers each tiny weight: whole on each rank
    ("llama_bias", "ct_block", {"block": 8}),  # 8-row blocks, each rank its own; biases
    ("qwen2", "fp8_tensor", {"static": True}),
    ("mixtral", "ct_channel", {}),  # experts' rows and columns with their channels' scales
    ("qwen3_moe", "fp8_block", {"block": 8}),
    # DeepSeek-V3's shape of fp8 checkpoint: multi-head latent attention (q_b/kv_b rows by
    # head, q_a/kv_a whole), a dense first layer, shared and routed experts
    ("deepseek_v3", "fp8_block", {"block": 8}),
]


def case_id(case) -> str:
    variant, fmt, opts = case
    return "-".join([variant, fmt, *(f"{k}{v}" for k, v in opts.items())])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tp2_fp8_checkpoints_match_the_dequantized_reference(tiny_checkpoints, tmp_path, engines,
                                                             case):
    variant, fmt, opts = case
    q = write_fp8_checkpoint(tiny_checkpoints[variant], tmp_path / "fp8", fmt, **opts)
    want = hf_greedy(hf_model(write_dequantized_checkpoint(q, tmp_path / "deq")), PROMPTS,
                     GREEDY.max_tokens)
    eng = make(q, 2, max_num_batched_tokens=8)
    engines.append(eng)
    assert [r.token_ids for r in eng.generate(PROMPTS, GREEDY)] == want
    assert eng.kv.all_free()


def test_a_rank_boundary_inside_a_scale_group_is_refused(tiny_checkpoints, tmp_path):
    # 48-row blocks over weights whose rows split 2 ways into 32s and 64s: refused
    # from the headers before any rank starts, naming a tensor and the numbers
    q = write_fp8_checkpoint(tiny_checkpoints["llama_bias"], tmp_path / "fp8", "ct_block", block=48)
    cfg = load_checkpoint(q).model_config
    with pytest.raises(TensorParallelConfigError,
                       match=r"splits into rows of (32|64), not whole groups of its fp8 scales' 48"):
        check(cfg, 2)
    check(cfg, 1)
    # and at load, should a shape slip by: a rank's rows [32, 64) of 48-row groups
    weight = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    part = RankScale(scale_slot(weight, 0, 32, 96, (48, 48), 48), 0, ((32, 32),))
    with pytest.raises(CheckpointError, match=r"rows \[32, 64\) split its fp8 scale groups of 48"):
        part.load("x.weight_scale", torch.ones(2, 2))


def _row_max_in_both_halves(src, out):
    """A copy of checkpoint ``src`` whose row-parallel projections (o_proj,
    down_proj) reach each row's largest magnitude in both halves of the row:
    per-row fp8 scales of either half are then those of the whole row."""
    shutil.copytree(src, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        for name, t in tensors.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                w, half = t.clone(), t.shape[1] // 2
                peak = w.abs().amax(1)
                w[:, 0], w[:, half] = peak, -peak
                tensors[name] = w
        save_file(tensors, file, metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_tp2_weight_dtype_fp8_quantizes_each_ranks_shard(tiny_checkpoints, tmp_path, engines):
    # Quantized at load on every rank, per output row of its shard: with each row's peak
    # in both halves, the shards' scales are the per-channel checkpoint's, so the engine
    # at TP 2 gives that checkpoint's logits exactly (a rank left unquantized would not)
    src = _row_max_in_both_halves(tiny_checkpoints["llama"], tmp_path / "src")
    ct = write_fp8_checkpoint(src, tmp_path / "ct", "ct_channel")
    on_load, stored = make(src, 2, weight_dtype="fp8"), make(ct, 2)
    engines.extend([on_load, stored])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    a, b = on_load.generate(PROMPTS, params), stored.generate(PROMPTS, params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        assert ([lp.logprob for lp in x.prompt_logprobs[1:]]
                == pytest.approx([lp.logprob for lp in y.prompt_logprobs[1:]], abs=1e-5))
    assert on_load.runner.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
