"""FP8 weights on a GPU: the compiled kernels against the torch references
(the bounds of tests/unit/test_fp8_gemm.py, with GPU rounding), and an fp8
checkpoint through the engine with CUDA graphs giving the eager engine's
tokens."""

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.models.layers import Linear
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import fp8_gemm as ref
from tests.fixtures.fp8_checkpoints import write_fp8_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fp8_cores() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("groups", [(1, 4096), (128, 128), (4096, 4096)])
@pytest.mark.parametrize("m", [1, 37, 512])
def test_compiled_gemms_match_reference(groups, m):
    from splitserve.kernels.triton import fp8_gemm as tri

    n, k = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    w8, scale = ref.quantize_weight(w, *groups)
    ops = ["fp8_w8a16_linear"] + (["fp8_w8a8_linear"] if fp8_cores() else [])
    for op in ops:
        got = getattr(tri, op)(x, w8, scale, *groups)
        want = getattr(ref, op)(x, w8, scale, *groups)
        xq = x.float() if op == "fp8_w8a16_linear" else (
            ref.quantize_per_token(x)[0].float() * ref.quantize_per_token(x)[1][:, None])
        bound = ref.gemm_rounding_bound(xq.abs(), ref.dequantize_weight(w8, scale, *groups).abs(),
                                        torch.bfloat16)
        assert ((got.float() - want.float()).abs() <= bound).all(), op
    if fp8_cores():
        x8, xs = tri.quantize_per_token(x)
        r8, rs = ref.quantize_per_token(x)
        assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(xs, rs)


def test_fp8_checkpoint_graphs_match_eager(tiny_checkpoints, tmp_path):
    q = write_fp8_checkpoint(tiny_checkpoints["llama_bf16"], tmp_path / "fp8", "fp8_block", block=32)
    kw = dict(model=str(q), device="cuda", dtype="bfloat16", num_blocks=256, block_size=16, max_num_seqs=8)
    graphed = LLMEngine(EngineConfig(**kw))
    eager = LLMEngine(EngineConfig(**kw, enforce_eager=True))
    linears = [m for m in graphed.runner.model.modules() if isinstance(m, Linear) and m.weight_scale is not None]
    assert linears and all(lin.fp8_activations == fp8_cores() for lin in linears)
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 17, 30, 2)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert ([r.token_ids for r in graphed.generate(prompts, sp)]
            == [r.token_ids for r in eager.generate(prompts, sp)])
    assert graphed.runner.graphs.replays > 0 and graphed.kv.all_free()
