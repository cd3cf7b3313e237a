"""``counting()`` builds its copy slot by slot: it must copy every field
(a field added to the stats and not to ``counting`` would be left unset)
and derive ``queue_s`` / ``load`` as the constructor does."""

import dataclasses

from splitserve.router.types import DecodeReplicaStats, PrefillReplicaStats


def _every_field_set(cls):
    # distinct non-default values, so a field copied from the wrong one shows
    return dict(
        replica_id="r-1", model="m", node_id="node-3", updated_at=12.5, healthy=False,
        draining=True, adapters=frozenset({"a"}), host_adapters=frozenset({"b"}),
        **({"pending_prompt_tokens": 700, "running_requests": 3, "prefill_tokens_per_s": 900.0}
           if cls is PrefillReplicaStats else
           {"free_blocks": 40, "total_blocks": 90, "running_seqs": 5, "max_seqs": 11, "block_size": 8,
            "waiting_requests": 2, "decode_step_s": 0.25, "prefill_tokens_per_s": 300.0,
            "pending_prefill_tokens": 17}))


def test_prefill_counting_copies_every_field():
    p = PrefillReplicaStats(**_every_field_set(PrefillReplicaStats))
    c = p.counting(pending_prompt_tokens=1800)
    assert c == dataclasses.replace(p, pending_prompt_tokens=1800)
    assert c.queue_s == 1800 / 900.0
    for f in dataclasses.fields(PrefillReplicaStats):
        assert hasattr(c, f.name), f.name


def test_decode_counting_copies_every_field():
    d = DecodeReplicaStats(**_every_field_set(DecodeReplicaStats))
    c = d.counting(free_blocks=30, waiting_requests=4, pending_prefill_tokens=50)
    assert c == dataclasses.replace(d, free_blocks=30, waiting_requests=4, pending_prefill_tokens=50)
    assert c.load == dataclasses.replace(d, free_blocks=30, waiting_requests=4).load
    c2 = d.counting(free_blocks=30, waiting_requests=4, pending_prefill_tokens=50, running_seqs=1)
    assert c2 == dataclasses.replace(d, free_blocks=30, waiting_requests=4, pending_prefill_tokens=50,
                                     running_seqs=1)
    for f in dataclasses.fields(DecodeReplicaStats):
        assert hasattr(c, f.name), f.name
