"""Per-sequence block tables over the shared ``BlockPool``.

The scheduler asks this manager for room; it answers with counts and never
exposes the pool's internals. Block tables leave as ``BlockTable`` values
(read-only). A reservation for an incoming hand-off is a block table owned
by the hand-off id, which the admitted sequence keeps as its own id.

A hybrid model's engine also hands each owner a recurrent-state slot
(``splitserve.engine.state_cache.StateSlots``) with its blocks, and frees it
with them. Its prefix caching needs recurrent-state checkpoints
(``splitserve.engine.state_checkpoints``; off without them): a prompt hits
at the longest block boundary that has both its KV blocks cached and a
checkpoint, whose copy becomes the sequence's state. To have a state at
each prompt's last full block, a prompt chunk that would end past a block
boundary inside the prompt ends at that boundary (``chunk_tokens``), its
tail running in the next step. Splitting was chosen over the recurrent
layers' per-token ``keep`` (speculative verify's): keeping a state per
token of a prompt chunk would hold thousands of states (tens of MiB each
on released models) where the split costs one more step for the prompt's
last partial block.
"""

from __future__ import annotations

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.sequence import Sequence
from splitserve.engine.state_cache import StateSlots
from splitserve.engine.state_checkpoints import StateCheckpoints


class BlockTable:
    """An opaque, read-only view of the blocks a sequence owns, in order."""

    __slots__ = ("_ids",)

    def __init__(self, ids: list[int]):
        self._ids = ids

    @property
    def block_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"BlockTable({self._ids})"


class KVCacheManager:
    """``states``: a hybrid model's live state slots; ``checkpoints``: its
    checkpoint pool, without which its prefix caching is off."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 states: StateSlots | None = None, checkpoints: StateCheckpoints | None = None):
        self.block_size = block_size
        self.states = states  # hybrid models: one recurrent-state slot per owner
        self.checkpoints = checkpoints if states is not None and enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, enable_prefix_caching
                              and (states is None or self.checkpoints is not None))
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # full blocks already registered per owner
        # owner -> the checkpoint slot its state starts from, until its first chunk ran
        self._restore: dict[str, int] = {}

    # -- queries ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, owner: str) -> BlockTable:
        return BlockTable(self._tables[owner])

    def raw_block_ids(self, owner: str) -> list[int]:
        """The live list, for the model runner's hot path. Do not mutate."""
        return self._tables[owner]

    def owners(self) -> list[str]:
        return list(self._tables)

    def has_owner(self, owner: str) -> bool:
        return owner in self._tables

    def state_slot(self, owner: str) -> int:
        """``owner``'s recurrent-state slot (hybrid models only)."""
        return self.states.slot(owner)

    def _take_state(self, owner: str) -> bool:
        """A state slot for ``owner`` where the model keeps states; False when none is free."""
        return self.states is None or self.states.acquire(owner) is not None

    def _match_prefix(self, token_hashes: list[int], max_blocks: int) -> list[int]:
        if not self.pool.enable_prefix_caching:
            return []
        get = self.pool.hash_to_block.get
        hits: list[int] = []
        for h in token_hashes[:max_blocks]:
            b = get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def chunk_tokens(self, seq: Sequence, start: int, n: int) -> int:
        """How many of the ``n`` tokens from ``start`` on to run as one chunk:
        with state checkpoints, a chunk that would end inside the prompt past
        a block boundary ends at the last such boundary (a checkpoint is
        taken there), unless that leaves it empty; else all ``n``."""
        end = start + n
        if self.checkpoints is None or end % self.block_size == 0 or end > seq.num_prompt_tokens:
            return n
        aligned = end - end % self.block_size
        return aligned - start if aligned > start else n

    def restore_slot(self, owner: str) -> int | None:
        """The checkpoint slot ``owner``'s state is to be copied from before
        its next chunk runs (it resumed from a prefix hit); None otherwise."""
        return self._restore.get(owner)

    def commit_state(self, seq: Sequence) -> None:
        """After a chunk of ``seq`` without drafts was computed and its full
        blocks cached (never a verify chunk: its state has seen the drafts):
        its state no longer needs its checkpoint, and is checkpointed when
        the chunk ended on a block boundary inside the prompt."""
        if self._restore:
            self._restore.pop(seq.seq_id, None)
        end = seq.num_computed_tokens
        if self.checkpoints is None or end == 0 or end % self.block_size or end > seq.num_prompt_tokens:
            return
        block = end // self.block_size - 1
        h = seq.block_hashes()[block]
        if self.pool.hash_to_block.get(h) is not None:  # its KV is cached (a hit needs both)
            self.checkpoints.save(h, self.states.slot(seq.seq_id))

    # -- allocation ------------------------------------------------------
    def allocate_prompt(self, seq: Sequence, token_budget: int) -> int:
        """First allocation of a waiting sequence: reuse its cached prefix,
        then allocate blocks for up to ``token_budget`` new tokens.

        Sets ``seq.num_computed_tokens`` to the cached length and returns how
        many tokens to compute now (0: not enough free blocks, nothing held).
        At least one token is always left to compute, for its logits; a
        sequence that wants its prompt's logprobs computes every token.
        """
        assert seq.seq_id not in self._tables, f"{seq.seq_id} already has blocks"
        self.pool.queries += 1
        max_cached = (seq.num_tokens - 1) // self.block_size
        if getattr(seq.params, "prompt_logprobs", None) is not None:
            max_cached = 0
        hashes = seq.block_hashes()
        hits = self._match_prefix(hashes, max_cached)
        if self.checkpoints is not None:  # a hybrid resumes where it has a state too
            hits = hits[:self.checkpoints.longest(hashes, len(hits))]
        num_cached = len(hits) * self.block_size
        n = self.chunk_tokens(seq, num_cached, min(seq.num_tokens - num_cached, token_budget))
        if n <= 0:
            return 0
        need = self.blocks_for(num_cached + n) - len(hits)
        hits_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if need > self.pool.num_free_blocks - hits_free or not self._take_state(seq.seq_id):
            return 0
        for b in hits:
            self.pool.acquire(b)
        if hits:
            self.pool.hits += 1
            if self.checkpoints is not None:
                self._restore[seq.seq_id] = self.checkpoints.take(hashes[len(hits) - 1])
        table = hits + self.pool.allocate_many(need) if need > 0 else hits
        self._tables[seq.seq_id] = table
        self._num_hashed[seq.seq_id] = len(hits)
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        return n

    def allocate_more(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow a running sequence's table to hold ``num_new_tokens`` more."""
        table = self._tables[seq.seq_id]
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(table)
        if need > self.pool.num_free_blocks:
            return False
        if need > 0:
            table += self.pool.allocate_many(need)
        return True

    def trim(self, owner: str, num_tokens: int) -> int:
        """Free the tail blocks of ``owner`` beyond those ``num_tokens``
        tokens need (speculative decoding: blocks allocated for draft tokens
        that were rejected). Never frees a registered (hashed) block, whose
        tokens were all accepted. Returns how many blocks were freed."""
        table = self._tables[owner]
        keep = max(self.blocks_for(num_tokens), self._num_hashed.get(owner, 0))
        freed = 0
        while len(table) > keep:
            self.pool.release(table.pop())
            freed += 1
        return freed

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed."""
        if not self.pool.enable_prefix_caching:
            return
        done = self._num_hashed.get(seq.seq_id, 0)
        full = seq.num_computed_tokens // self.block_size
        if full <= done:
            return  # the common case (no block filled since): one lookup
        table = self._tables[seq.seq_id]
        full = min(full, len(table))
        if full <= done:
            return
        hashes = seq.block_hashes()
        end = min(full, len(hashes))
        self.pool.set_hashes(table[done:end], hashes[done:end])
        self._num_hashed[seq.seq_id] = end

    def free(self, owner: str) -> None:
        """Release every block of ``owner``. Tail blocks go first so the
        shared head of a prefix stays cached longest. Idempotent."""
        table = self._tables.pop(owner, None)
        self._num_hashed.pop(owner, None)
        self._restore.pop(owner, None)
        if self.states is not None:
            self.states.release(owner)
        if table is None:
            return
        self.pool.release_many(reversed(table))

    # -- hand-off reservations ------------------------------------------
    def reserve(self, owner: str, token_hashes: list[int], num_tokens: int) -> tuple[list[int], int] | None:
        """Hold blocks for an incoming sequence of ``num_tokens`` tokens whose
        full-block hashes are ``token_hashes``. Returns (block ids, tokens
        already cached here, whose blocks need not be sent) or None if full.
        A hybrid model's cached blocks count without a state checkpoint: the
        hand-off carries the state after the whole prompt."""
        assert owner not in self._tables, f"{owner} already holds blocks"
        self.pool.queries += 1
        hits = self._match_prefix(token_hashes, (num_tokens - 1) // self.block_size)
        need = self.blocks_for(num_tokens) - len(hits)
        hits_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if need > self.pool.num_free_blocks - hits_free or not self._take_state(owner):
            return None
        for b in hits:
            self.pool.acquire(b)
        if hits:
            self.pool.hits += 1
        table = hits + self.pool.allocate_many(need) if need > 0 else hits
        self._tables[owner] = table
        self._num_hashed[owner] = len(hits)
        return list(table), len(hits) * self.block_size

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for table in self._tables.values():
            for b in table:
                refs[b] += 1
        assert refs == self.pool.ref_counts, "block tables and reference counts disagree"
        if self.checkpoints is not None:
            assert self.checkpoints.accounted(), "a state checkpoint slot is lost or held twice"
        for owner, slot in self._restore.items():
            assert owner in self._tables and self.checkpoints.holds(slot), \
                f"{owner} resumes from checkpoint slot {slot}, which it or the pool no longer holds"

    def all_free(self) -> bool:
        """True when no block is referenced and no live state slot held: the
        leak check tests end with (cached blocks and state checkpoints stay,
        accounted for)."""
        return (not self._tables and not self._restore
                and self.pool.num_free_blocks == self.pool.num_blocks
                and (self.states is None or self.states.all_free())
                and (self.checkpoints is None or self.checkpoints.accounted()))
