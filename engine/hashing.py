"""Chained block hashes of token ids: the one prefix-cache key.

The engine keys cached KV blocks by these hashes and the router indexes
replicas' caches by the same function, so it must stay deterministic across
processes and machines (no Python ``hash``) and free of torch imports.
A block's hash covers its own tokens and, through its parent's hash, every
token before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

ROOT_HASH = 0


_STRUCTS: dict[int, struct.Struct] = {}


def hash_block(parent_hash: int, token_ids: Sequence[int], salt: bytes = b"") -> int:
    """64-bit hash of one full block given its parent's hash (ROOT_HASH first)."""
    n = len(token_ids)
    st = _STRUCTS.get(n)
    if st is None:
        st = _STRUCTS.setdefault(n, struct.Struct(f"<Q{n}I"))
    digest = hashlib.blake2b(st.pack(parent_hash, *token_ids), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "little")


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[int]:
    """Hashes of every *full* block of ``token_ids``, in order."""
    out: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], salt)
        out.append(parent)
    return out
