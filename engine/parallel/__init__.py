"""Tensor parallelism: one replica's model spread over several ranks.

Rank 0 is the replica's engine (scheduler, sampler, KV bookkeeping); ranks
1..N-1 are processes the engine spawns (``launcher``), each holding a
shard of every layer (``plan``, ``sharding``) and its heads' part of the
paged KV cache (and of a Gated DeltaNet hybrid's recurrent states),
running each step's forward in lockstep (``rank_worker``).
Collectives go over process groups built without a global default group
(``group``): gloo on CPUs, NCCL on GPUs. The KV hand-off sees whole heads:
rank 0 gathers and scatters the ranks' head slices (``kv``).
"""
