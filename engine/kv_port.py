"""KVPort: the engine's one seam for moving a sequence's KV to another engine.

In the spirit of vLLM's KV connector hooks, the hand-off protocol
(``splitserve.handoff.protocol``) sees the engine only through this class
and the values defined here: never its scheduler, block manager, tokenizer
or cache tensor. Every engine has one, ``LLMEngine.kv_port``.

Who calls what. Every method runs on the engine's thread (between steps),
except ``import_layers``, which transports call from their own threads
while the engine steps; it writes only into blocks reserved for that
hand-off, which nothing else reads until ``admit``.

  source (prefill role), after a ``prefill_only`` request finished:
    export_sequence(id)   prompt, first token, params and logprobs
    export_layers(...)    its blocks for a layer range, packed contiguous
    release(id)           frees them (hand-off done, or failed)
  target (decode role):
    reserve(...)          holds blocks for an incoming sequence; blocks of a
                          prefix this engine caches already count as received
    import_layers(...)    writes received layers into the reserved blocks
    import_state(...)     a hybrid model's recurrent states after the prompt
                          (the source's ``export_state``), into the
                          reservation's state slot
    cancel(id)            frees a reservation
    admit(...)            turns a filled reservation into a running sequence
    add_reservation_holder(h)
                          ``LLMEngine.abort`` of an id with no request asks
                          each holder to ``cancel`` it (a request still
                          waiting for its KV)
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from splitserve.engine.errors import InvalidRequestError, OutOfBlocksError
from splitserve.engine.hashing import block_hashes
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampler import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import FinishReason
from splitserve.engine.structured import GrammarMatcher

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

__all__ = ["AdapterRef", "BlockReservation", "FinishReason", "HandoffSequence", "KVCacheSpec", "KVPort",
           "ReservationHolder", "TokenLogprobs"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVCacheSpec:
    """This engine's KV geometry: what must match for blocks to move."""

    model_id: str
    dtype: str  # the model's compute dtype, e.g. "bfloat16"
    kv_dtype: str  # the cache's storage dtype, e.g. "float8_e4m3fn"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bytes_per_block: int  # one block's K and V over every layer, every head
    # ranks the engine's heads are split over; the port moves whole heads at any degree
    tensor_parallel_size: int = 1
    # a hybrid model's recurrent-state kinds (splitserve.engine.state_cache): a hand-off
    # carries each sequence's states with its blocks; empty: none
    state_kinds: tuple[str, ...] = ()
    state_bytes: int = 0  # one sequence's recurrent states, every kind and layer
    # each kind's whole (every rank's) states of one sequence: (name, [state layers,
    # *shape], dtype name), what ``KVPort.export_state`` returns at any TP degree
    state_shapes: tuple[tuple[str, tuple[int, ...], str], ...] = ()


@dataclass(frozen=True)
class HandoffSequence:
    """A sequence whose prompt KV is computed and whose first token is
    sampled: what the source exports and the target admits."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    params: SamplingParams
    first_logprobs: TokenLogprobs | None
    # when asked for: [None, logprobs of prompt token 1 given token 0, ...]
    prompt_logprobs: list[TokenLogprobs | None] | None
    adapter: AdapterRef | None = None  # the LoRA adapter its KV was computed with


@dataclass(frozen=True)
class BlockReservation:
    """Blocks held for an incoming sequence of ``num_tokens`` prompt tokens.
    The first ``num_cached_blocks`` hold a prefix this engine had cached
    (``cached_tokens`` tokens): they are not sent. ``blocks_to_receive`` are
    the rest, in order."""

    handoff_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    cached_tokens: int
    num_cached_blocks: int
    bytes_to_receive: int

    @property
    def blocks_to_receive(self) -> tuple[int, ...]:
        return self.block_ids[self.num_cached_blocks:]


class ReservationHolder(Protocol):
    """Whoever keeps open reservations (the hand-off's reservation table)."""

    def cancel(self, handoff_id: str) -> bool:
        """Free the reservation ``handoff_id``; whether it was open."""


class KVPort:
    def __init__(self, engine: "LLMEngine"):
        self._engine = engine
        cache = engine.runner.kv_cache  # [L, 2, num_blocks, BS, Hk (this rank's), D]
        mc = engine.model_cfg
        self._spec = KVCacheSpec(
            model_id=engine.model_id, dtype=dtype_name(engine.dtype),
            kv_dtype=dtype_name(cache.dtype), block_size=engine.cfg.block_size,
            num_layers=mc.num_cache_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            bytes_per_block=mc.kv_bytes_per_token(cache.dtype) * engine.cfg.block_size,
            tensor_parallel_size=engine.cfg.tensor_parallel_size,
            state_kinds=tuple(s.name for s in mc.options.hybrid.states) if mc.options.hybrid else (),
            state_bytes=(mc.options.hybrid.state_bytes_per_sequence(engine.dtype.itemsize)
                         if mc.options.hybrid else 0),
            state_shapes=tuple(
                (s.name, (len(mc.options.hybrid.state_layers), *s.shape),
                 "float32" if s.dtype == "float32" else dtype_name(engine.dtype))
                for s in mc.options.hybrid.states) if mc.options.hybrid else ())
        self._holders: weakref.WeakSet = weakref.WeakSet()

    def spec(self) -> KVCacheSpec:
        return self._spec

    # -- source -------------------------------------------------------------------
    def export_sequence(self, request_id: str) -> HandoffSequence:
        """The finished prefill-only request ``request_id``. Raises
        InvalidRequestError when no such request holds its KV for a hand-off."""
        st = self._engine.requests.get(request_id)
        if st is None or st.seq.finish_reason is not FinishReason.HANDOFF:
            raise InvalidRequestError(f"request {request_id!r} holds no finished prefill to export")
        seq = st.seq
        return HandoffSequence(
            request_id=request_id, prompt_token_ids=seq.prompt_token_ids,
            first_token_id=seq.token_ids[seq.num_prompt_tokens], params=st.params,
            first_logprobs=st.logprobs[0] if st.logprobs else None,
            prompt_logprobs=None if st.prompt_logprobs is None else list(st.prompt_logprobs),
            adapter=seq.adapter)

    def export_layers(self, request_id: str, layer_start: int, layer_end: int,
                      skip_tokens: int = 0) -> torch.Tensor:
        """Layers [layer_start, layer_end) of the blocks of ``request_id``,
        without the first ``skip_tokens`` (whole blocks the target caches).
        Returns a new tensor [layer_end - layer_start, 2, n, BS, Hk, D]."""
        eng = self._engine
        ids = eng.kv.raw_block_ids(request_id)[skip_tokens // self._spec.block_size:]
        return eng.runner.pack_kv(list(ids), layer_start, layer_end)

    def export_state(self, request_id: str) -> dict[str, torch.Tensor] | None:
        """A hybrid model's recurrent states of ``request_id`` after its prompt
        (copies, name -> [state layers, *shape], whole at any TP degree);
        None for other models."""
        runner = self._engine.runner
        if runner.state is None:
            return None
        return runner.pack_state(self._engine.kv.state_slot(request_id))

    def release(self, request_id: str) -> None:
        """Free what a finished prefill-only request holds. Idempotent."""
        self._engine.requests.pop(request_id, None)
        self._engine.kv.free(request_id)

    # -- target -------------------------------------------------------------------
    def reserve(self, handoff_id: str, prompt_token_ids: list[int],
                max_tokens: int | None, adapter: AdapterRef | None = None) -> BlockReservation:
        """Hold blocks for an incoming prompt that may grow by ``max_tokens``,
        its KV computed with ``adapter`` (whose cached prefix blocks count:
        never the base model's or another adapter's). Raises OutOfBlocksError
        when they do not fit (now, or ever), InvalidRequestError when
        ``handoff_id`` already names a sequence, AdapterUnavailableError when
        this engine cannot load the adapter."""
        eng = self._engine
        n = len(prompt_token_ids)
        need_total = n + (max_tokens or 1)
        if eng.kv.blocks_for(need_total) > eng.kv.num_blocks or need_total > eng.max_model_len:
            raise OutOfBlocksError(f"a sequence of {need_total} tokens can never fit this replica")
        eng.check_id_free(handoff_id)
        ref = eng.resolve_adapter(adapter)  # in host memory before any block is held
        hashes = block_hashes(prompt_token_ids, self._spec.block_size, eng.hash_salt,
                              root=ref.hash_root if ref is not None else 0)
        got = eng.kv.reserve(handoff_id, hashes, n)
        if got is None:
            raise OutOfBlocksError(
                f"{eng.kv.num_free_blocks} free blocks cannot hold {eng.kv.blocks_for(n)}")
        ids, cached = got
        num_cached = cached // self._spec.block_size
        return BlockReservation(handoff_id, tuple(ids), n, cached, num_cached,
                                (len(ids) - num_cached) * self._spec.bytes_per_block)

    def import_layers(self, reservation: BlockReservation, layer_start: int,
                      buf: torch.Tensor) -> None:
        """Write ``buf`` [layers, 2, len(blocks_to_receive), BS, Hk, D] into
        the reservation's blocks from layer ``layer_start`` on. Any thread."""
        ids = reservation.blocks_to_receive
        if buf.shape[2] != len(ids) or layer_start + buf.shape[0] > self._spec.num_layers:
            raise ValueError(f"a chunk of shape {tuple(buf.shape)} from layer {layer_start} does "
                             f"not fit {len(ids)} blocks of {self._spec.num_layers} layers")
        if ids:
            self._engine.runner.unpack_kv(buf, list(ids), layer_start)

    def import_state(self, reservation: BlockReservation, states: dict[str, torch.Tensor]) -> None:
        """Write the source's ``export_state`` into the reservation's state slot
        (engine thread). Raises ValueError when the kinds or shapes differ."""
        runner = self._engine.runner
        if runner.state is None:
            raise ValueError("this engine's model keeps no recurrent state")
        runner.unpack_state(self._engine.kv.state_slot(reservation.handoff_id), states)

    def cancel(self, handoff_id: str) -> None:
        """Free a reservation's blocks. Idempotent."""
        self._engine.kv.free(handoff_id)

    def admit(self, reservation: BlockReservation, seq: HandoffSequence,
              matcher: GrammarMatcher | None = None) -> RequestOutput:
        """Turn the filled reservation into sequence ``seq.request_id`` (the
        same id) whose prompt KV is computed: its first token is processed
        as if sampled here (stop checks, text) and it joins the running
        batch (parked, blocks held, while the batch holds ``max_num_seqs``
        sequences or until its adapter, if any, gets a device slot).
        Returns that first output. ``matcher``: its structured-output
        matcher, from ``LLMEngine.build_matcher``. On failure the
        reservation's blocks are freed."""
        eng = self._engine
        rid = reservation.handoff_id
        if seq.request_id != rid:
            raise InvalidRequestError(
                f"sequence {seq.request_id!r} cannot adopt the blocks of hand-off {rid!r}")
        try:
            ref = eng.resolve_adapter(seq.adapter)
            st = eng.new_request_state(rid, seq.prompt_token_ids, seq.params, matcher, ref)
        except BaseException:
            eng.kv.free(rid)  # the reservation's blocks: nothing else will free them
            raise
        s = st.seq
        s.num_computed_tokens = reservation.num_tokens
        s.num_cached_tokens = reservation.cached_tokens
        eng.requests[rid] = st
        if seq.prompt_logprobs is not None and st.prompt_logprobs is not None:
            st.prompt_logprobs = list(seq.prompt_logprobs)
        out, reason = st.on_token(seq.first_token_id, seq.first_logprobs)
        s.first_token_time = time.monotonic()
        eng.kv.cache_full_blocks(s)
        if reason is not None:
            eng.scheduler.finish(s, reason)
            del eng.requests[rid]
        else:
            eng.scheduler.add_running(s)
        return out

    def add_reservation_holder(self, holder: ReservationHolder) -> None:
        """Let ``LLMEngine.abort`` reach ``holder``'s reservations (held weakly)."""
        self._holders.add(holder)

    def cancel_held(self, handoff_id: str) -> bool:
        """Called by ``LLMEngine.abort``: whether a holder had it open."""
        return any(h.cancel(handoff_id) for h in list(self._holders))
