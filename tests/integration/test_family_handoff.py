"""Every attention layout of the model families through the real KV
hand-off: a prefill and a decode engine in this process over gRPC
(``tests.integration.pd_harness``), a prompt longer than the sliding
windows, greedy tokens equal to transformers' ``generate``; then the
stream resumed after 3 tokens as the ingress resumes one whose decode
replica died (prompt + those tokens, marked ``resumed_tokens``, prefilled
on the prefill engine, its KV handed off again onto blocks the decode
engine partly caches) continues with exactly the reference's tail.

Layouts: a window on every layer (Mistral), on some (Qwen2 past
max_window_layers; Gemma 3, whose sliding layers have their own RoPE
base), LongRoPE on half of each head with a window (Phi-3), layers
without RoPE (SmolLM3), LayerNorm blocks with a window on every layer
(StarCoder2), learned absolute positions instead of RoPE (GPT-2), a
mixture of experts with a shared expert (Qwen2-MoE), one KV head for four
query heads (Falcon multi-query), OLMoE's clamped q/k/v and sparse MLP,
keys cached with their rows reordered for interleaved RoPE (Cohere),
partial rotate-half RoPE before GLM-4.5's grouped-router experts,
Cohere 2's window on one layer beside an unrotated full-attention layer,
learned positions with a window on some layers (GPT-Neo), a sliding
layer beside a full-attention one without RoPE behind OLMo 2's
post-norms (EXAONE 4), PhiMoE's sparsemixer experts behind LayerNorms
with a window on every layer and its own LongRoPE table, attention sinks
beside a window on one layer and gpt-oss's biased, clamped experts
(gpt-oss), L2-normed keys beside unrotated ones before input-scaled
experts (Llama 4), latent attention (DeepSeek-V3), ALiBi's position
biases in place of RoPE (Bloom), which the decode engine must compute
from the handed-off keys' positions, queries scaled by their position past
YaRN-rotated keys with a window on every layer (Ministral 3), an fp8 KV
cache (Gemma 3 again, against the engine itself: fp8 changes the numbers),
and latent attention with values narrower than its keys, a sparse layer
before a dense one (GLM-4.7-Flash), and Gated DeltaNet layers whose
recurrent states go as one chunk after gated attention layers' blocks
(Qwen3-Next: the resumed stream's cached prefix blocks stay put on the
decode side, the state after the whole prompt still sent), and
Mamba, with no attention layer: no KV block at all, its states alone in the
reply."""

import asyncio

import pytest

from splitserve.engine.sampling_params import SamplingParams
from tests.fixtures.checkpoints import hf_greedy, hf_model
from tests.integration.pd_harness import make_engine, start_pd

NEW, CUT = 8, 3
NO_CACHE = ("mamba",)  # no attention layer: no KV block is sent, the states ride in the reply
PROMPT = [(37 * i + 11) % 500 + 3 for i in range(26)]  # > the fixtures' windows of 8


def greedy(n: int, resumed: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, resumed_tokens=resumed)


@pytest.mark.parametrize("variant, kv", [
    ("mistral_window", "auto"), ("qwen2_window", "auto"), ("gemma3", "auto"),
    ("phi3_longrope", "auto"), ("smollm3", "auto"), ("starcoder2", "auto"), ("qwen2_moe", "auto"),
    ("gpt2", "auto"), ("falcon_mq", "auto"), ("olmoe", "auto"), ("cohere", "auto"),
    ("glm4_moe", "auto"), ("cohere2", "auto"), ("gpt_neo", "auto"), ("exaone4", "auto"),
    ("phimoe", "auto"), ("gpt_oss", "auto"), ("llama4", "auto"), ("deepseek_v3", "auto"),
    ("bloom", "auto"), ("gemma3", "fp8"), ("ministral3", "auto"), ("glm4_moe_lite", "auto"),
    ("qwen3_next", "auto"), ("mamba", "auto"),
])
def test_family_through_the_handoff_and_a_resume(tiny_checkpoints, variant, kv):
    path = tiny_checkpoints[variant]
    if kv == "auto":
        want = hf_greedy(hf_model(path), [PROMPT], NEW)[0]
    else:
        want = make_engine(path, kv_cache_dtype=kv).generate([PROMPT], greedy(NEW))[0].token_ids

    async def main():
        pd = await start_pd(make_engine(path, kv_cache_dtype=kv),
                            make_engine(path, kv_cache_dtype=kv))
        try:
            got, first = await pd.generate(PROMPT, greedy(NEW))
            assert first.mode.value == "remote" and (first.bytes > 0) == (variant not in NO_CACHE)
            assert got == want
            tail, resumed = await pd.generate(PROMPT + want[:CUT], greedy(NEW - CUT, CUT))
            assert resumed.mode.value == "remote"
            if variant in NO_CACHE:
                assert resumed.bytes == 0
            else:
                assert 0 < resumed.bytes < first.bytes  # the cached prefix's blocks stay put
            assert tail == want[CUT:]
            assert pd.decode.counters["handoffs"] == 2 and pd.decode.counters["fallbacks"] == 0
            assert pd.all_free()
            for e in (pd.prefill.engine, pd.decode.engine):
                e.kv.check_invariants()
        finally:
            await pd.close()
    asyncio.run(main())


@pytest.mark.parametrize("transport", ["grpc", "torch_dist"])
def test_a_hybrids_states_travel_as_a_chunk_past_its_kv_layers(tiny_checkpoints, transport):
    """Qwen3-Next's recurrent states go over the KV transport (gloo here, NCCL
    on GPUs) as one chunk after its layers, not in the reply: the bytes sent
    are its blocks' and its states'; a state chunk of another size is refused."""
    import math

    import torch

    from splitserve.handoff.protocol import states_by_chunk
    from splitserve.handoff.transfer.base import make_header
    from splitserve.handoff.transfer.errors import MessageTooLarge

    path = tiny_checkpoints["qwen3_next"]
    want = hf_greedy(hf_model(path), [PROMPT], NEW)[0]

    async def main():
        pd = await start_pd(make_engine(path), make_engine(path), transport=transport)
        try:
            spec = pd.prefill.engine.kv_port.spec()
            assert states_by_chunk(pd.prefill.engine.kv_port) and spec.state_bytes > 0
            got, first = await pd.generate(PROMPT, greedy(NEW))
            assert got == want
            blocks = math.ceil(len(PROMPT) / spec.block_size)
            assert first.bytes == blocks * spec.bytes_per_block + spec.state_bytes
            table, on_engine = pd.decode.reservations, pd.decode.aengine.call
            await on_engine(lambda _e: table.reserve("odd", table.layout, PROMPT, 4))
            bad = torch.zeros(1, spec.state_bytes - 1, dtype=torch.uint8)
            with pytest.raises(MessageTooLarge, match="state chunk"):
                table.write_layers(make_header("odd", spec.num_layers, spec.num_layers + 1, bad), bad)
            await on_engine(lambda _e: table.cancel("odd"))
            assert pd.all_free()
        finally:
            await pd.close()
    asyncio.run(main())
