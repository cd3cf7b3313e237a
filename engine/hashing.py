"""Deterministic hashes, the same in every process and on every machine
(no Python ``hash``), and free of torch imports.

Chained block hashes of token ids are the one prefix-cache key: the engine
keys cached KV blocks by them and the router indexes replicas' caches by the
same function. A block's hash covers its own tokens and, through its
parent's hash, every token before it, so equal hashes mean equal prefixes.

``splitmix64`` scatters the bits of a 64-bit integer; seeds are derived with
it (the sampler's per-step seeds, the seeds of a request's sibling choices).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

ROOT_HASH = 0
MASK64 = (1 << 64) - 1
# splitmix64's increment (2**64 / golden ratio) and its finalizer's multipliers
SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB


_STRUCTS: dict[int, struct.Struct] = {}


def hash_block(parent_hash: int, token_ids: Sequence[int], salt: bytes = b"") -> int:
    """64-bit hash of one full block given its parent's hash (ROOT_HASH first)."""
    n = len(token_ids)
    st = _STRUCTS.get(n)
    if st is None:
        st = _STRUCTS.setdefault(n, struct.Struct(f"<Q{n}I"))
    digest = hashlib.blake2b(st.pack(parent_hash, *token_ids), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "little")


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"",
                 root: int = ROOT_HASH) -> list[int]:
    """Hashes of every *full* block of ``token_ids``, in order; ``root``: the
    first block's parent (an adapter's ``adapter_root_hash``)."""
    out: list[int] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], salt)
        out.append(parent)
    return out


def splitmix64(z: int) -> int:
    """The splitmix64 step: ``z`` advanced by the golden increment and put
    through the finalizer. A bijection on uint64 (``z`` is taken mod 2**64)."""
    z = (z + SPLITMIX_GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX_MUL1) & MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX_MUL2) & MASK64
    return z ^ (z >> 31)


def adapter_root_hash(identity: str) -> int:
    """The root of the block-hash chain of prompts run with the adapter
    ``identity`` (its digest) in place of ROOT_HASH: a block cached for one
    adapter, or for the base model, never matches another's."""
    digest = hashlib.blake2b(b"splitserve-lora\0" + identity.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
