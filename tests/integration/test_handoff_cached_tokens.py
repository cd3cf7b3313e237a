"""The prompt tokens a request reports as cached (``GenerateOutput.cached_tokens``,
the client's ``usage.prompt_tokens_details.cached_tokens``) through a real
hand-off: a prefill replica's prefix-cache hits count as much as the decode
replica's own, and the two (both prefixes of the same prompt) are never added.
A prefill worker and a decode worker in this process, on real gRPC."""

import asyncio

import pytest

from splitserve.engine.sampling_params import SamplingParams
from tests.integration.pd_harness import make_engine, start_pd, wait_until

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # 13 tokens, 3 whole blocks of 4
BLOCK = 4
REUSABLE = (len(PROMPT) - 1) // BLOCK * BLOCK  # the last token is always computed: 12


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return make_engine(tiny_llama).generate([PROMPT], GREEDY)[0].token_ids


async def _run(pd, prompt, prefill=True):
    """(token ids, cached tokens of every output, prompt tokens, mode)."""
    toks, cached, prompt_tokens, mode = [], [], None, None
    async for out in pd.client.generate(pd.request(prompt, GREEDY, prefill)):
        toks += out.token_ids
        cached.append(out.cached_tokens)
        prompt_tokens = out.prompt_tokens
        mode = mode or (out.timings.mode.value if out.timings is not None else None)
    return toks, cached, prompt_tokens, mode


def _forget_cache(worker):
    """Drop every cached-but-free block of ``worker``'s engine (engine thread)."""
    return worker.aengine.call(lambda e: e.kv.pool.reset_prefix_cache())


def test_prefill_replica_hits_reach_the_usage(tiny_llama, reference):
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        try:
            # nothing cached anywhere: nothing reported
            toks, cached, n, mode = await _run(pd, PROMPT)
            assert (toks, mode, n) == (reference, "remote", len(PROMPT))
            assert set(cached) == {0}
            assert await wait_until(pd.all_free, 5)

            # only the prefill replica holds the prompt: its reused blocks count
            hits = pd.prefill.engine.kv.pool.hits
            await _forget_cache(pd.decode)
            toks, cached, n, mode = await _run(pd, PROMPT)
            assert (toks, mode) == (reference, "remote")
            assert pd.prefill.engine.kv.pool.hits == hits + 1  # it did reuse them
            assert set(cached) == {REUSABLE}, cached
            assert await wait_until(pd.all_free, 5)

            # only the decode replica holds it (it kept what it received): its hits count
            await _forget_cache(pd.prefill)
            toks, cached, _, mode = await _run(pd, PROMPT)
            assert (toks, mode) == (reference, "remote")
            assert set(cached) == {REUSABLE}, cached
            assert await wait_until(pd.all_free, 5)

            # both hold it: the same prefix, counted once (never the sum)
            toks, cached, n, mode = await _run(pd, PROMPT)
            assert (toks, mode) == (reference, "remote")
            assert set(cached) == {REUSABLE} and REUSABLE < n, cached

            # prefilled on the decode replica: its own hits, as before
            toks, cached, _, mode = await _run(pd, PROMPT, prefill=False)
            assert (toks, mode) == (reference, "local")
            assert set(cached) == {REUSABLE}, cached
        finally:
            await pd.close()
    asyncio.run(main())


def test_a_longer_prefill_side_prefix_wins(tiny_llama, reference):
    """The decode replica holds a shorter prefix of the prompt than the
    prefill replica: the request reports the longer one."""
    async def main():
        pd = await start_pd(make_engine(tiny_llama), make_engine(tiny_llama))
        try:
            await _run(pd, PROMPT)  # both replicas now hold PROMPT's 3 blocks
            await _forget_cache(pd.decode)
            await _run(pd, PROMPT[:6], prefill=False)  # the decode replica: 1 block of it
            toks, cached, _, mode = await _run(pd, PROMPT)
            assert (toks, mode) == (reference, "remote")
            assert set(cached) == {REUSABLE}, cached
            assert await wait_until(pd.all_free, 5)
        finally:
            await pd.close()
    asyncio.run(main())


def test_the_ingress_usage_and_metric_count_the_prefill_replicas_hits(tiny_llama, reference):
    """Through the ingress's ClusterBackend (its orchestrator and request
    recorder): the output dicts usage is built from, and
    splitserve_cached_prompt_tokens_total, carry the prefill replica's hits."""
    from splitserve.cluster.observability.metrics import PROCESS_REGISTRY
    from tests.integration.test_isolation import start_cluster

    def counted() -> float:
        return PROCESS_REGISTRY.get_sample_value(
            "splitserve_cached_prompt_tokens_total", {"model": "tiny"}) or 0.0

    async def run(be, rid):
        toks, cached = [], set()
        async for d in be.generate("tiny", rid, PROMPT, GREEDY):
            toks += d["token_ids"]
            cached.add((d["cached_tokens"], d["prompt_tokens"], d["placement"]["prefill"]))
        return toks, cached

    async def main():
        c = await start_cluster(tiny_llama)
        try:
            c.router.decodes = [c.pd.decode_addr]
            before = counted()
            toks, cached = await run(c.backend, "first")
            assert toks == reference and cached == {(0, len(PROMPT), c.pd.prefill_addr)}
            assert counted() == before
            await _forget_cache(c.pd.decode)  # only the prefill replica holds it now
            toks, cached = await run(c.backend, "second")
            assert toks == reference and cached == {(REUSABLE, len(PROMPT), c.pd.prefill_addr)}
            assert counted() == before + REUSABLE
        finally:
            await c.close()
    asyncio.run(main())
