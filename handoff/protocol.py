"""KV hand-off between engine instances: export on the source, reservations
and import on the target.

Source (prefill role): a ``prefill_only`` request finishes with its blocks
held; ``export_meta`` describes it and ``export_layers`` packs any layer
range of its blocks into one contiguous buffer. ``release`` frees them.

Target (decode role): ``Reservations.reserve`` holds blocks for an incoming
sequence under a hand-off id with a lease; received layer groups are written
straight into those blocks (``write_layers``, the transport's ``KVSink``);
``commit`` turns the reservation into a running sequence that continues
exactly as if this engine had run the prefill. ``cancel`` and lease expiry
free the blocks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.engine.errors import IncompatibleKVError, InvalidRequestError, OutOfBlocksError
from splitserve.engine.hashing import block_hashes
from splitserve.engine.outputs import logprob_dict
from splitserve.engine.request_state import RequestState
from splitserve.engine.sampler import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff.transfer.base import ChunkHeader, KVLayout, KVSink
from splitserve.handoff.transfer.errors import MessageTooLarge, UnknownHandoffError
from splitserve.kernels import ops

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float8_e4m3fn: "float8_e4m3fn"}


def engine_layout(engine) -> KVLayout:
    mc = engine.model_cfg
    return KVLayout(
        model_id=engine.model_id, dtype=DTYPE_NAMES[engine.dtype],
        kv_dtype=DTYPE_NAMES[engine.runner.kv_dtype], block_size=engine.cfg.block_size,
        num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
    )


@dataclass
class HandoffMeta:
    """Everything the target needs besides the KV bytes (msgpack-able via to_dict)."""

    request_id: str
    layout: KVLayout
    prompt_token_ids: list[int]
    first_token_id: int
    params: dict[str, Any]
    first_logprobs: dict[str, Any] | None = None
    # where asked for: [None, logprobs of prompt token 1, ...] (wire form)
    prompt_logprobs: list[dict[str, Any] | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "layout": self.layout.to_dict(),
                "prompt_token_ids": list(self.prompt_token_ids),
                "first_token_id": self.first_token_id, "params": self.params,
                "first_logprobs": self.first_logprobs, "prompt_logprobs": self.prompt_logprobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HandoffMeta":
        return cls(d["request_id"], KVLayout.from_dict(d["layout"]), list(d["prompt_token_ids"]),
                   int(d["first_token_id"]), dict(d["params"]), d.get("first_logprobs"),
                   d.get("prompt_logprobs"))


def _lp_to_dict(lp: TokenLogprobs | None) -> dict[str, Any] | None:
    return None if lp is None else logprob_dict(lp)


def _lp_from_dict(d: dict[str, Any] | None) -> TokenLogprobs | None:
    if d is None:
        return None
    return TokenLogprobs(int(d["token_id"]), float(d["logprob"]), [(int(a), float(b)) for a, b in d["top"]])


# -- source side ----------------------------------------------------------------
def export_meta(engine, request_id: str) -> HandoffMeta:
    st = engine.requests.get(request_id)
    if st is None or st.seq.finish_reason is None or st.seq.finish_reason.value != "handoff":
        raise InvalidRequestError(f"request {request_id!r} holds no finished prefill to export")
    seq = st.seq
    return HandoffMeta(
        request_id=request_id, layout=engine_layout(engine),
        prompt_token_ids=seq.prompt_token_ids, first_token_id=seq.token_ids[seq.num_prompt_tokens],
        params=st.params.to_dict(), first_logprobs=_lp_to_dict(st.logprobs[0] if st.logprobs else None),
        prompt_logprobs=(None if st.prompt_logprobs is None
                         else [_lp_to_dict(lp) for lp in st.prompt_logprobs]),
    )


def export_layers(engine, request_id: str, layer_start: int, layer_end: int,
                  skip_tokens: int = 0) -> torch.Tensor:
    """Pack blocks of ``request_id`` for layers [layer_start, layer_end),
    leaving out the first ``skip_tokens`` (whole blocks the target already
    caches). Returns [layers, 2, n, BS, Hk, D]."""
    ids = engine.kv.raw_block_ids(request_id)[skip_tokens // engine.cfg.block_size:]
    idx = torch.tensor(ids, dtype=torch.int64, device=engine.device)
    return ops.pack_kv(engine.runner.kv_cache, idx, layer_start, layer_end)


# -- target side ----------------------------------------------------------------
@dataclass
class Reservation:
    handoff_id: str
    block_ids: list[int]
    num_tokens: int
    cached_tokens: int  # already in this engine's prefix cache; not sent
    deadline: float
    layers_received: set[int] = field(default_factory=set)
    bytes_allowed: int = 0


class Reservations(KVSink):
    """The target engine's open hand-offs. Thread-safe: transports write from
    their own threads while the engine loop commits."""

    def __init__(self, engine, lease_s: float = 30.0):
        self.engine = engine
        self.lease_s = lease_s
        self.layout = engine_layout(engine)
        self._open: dict[str, Reservation] = {}
        self._lock = threading.Lock()
        self.expired = 0
        engine.handoff_sinks.add(self)

    def reserve(self, handoff_id: str, layout: KVLayout, prompt_token_ids: list[int],
                max_tokens: int | None, lease_s: float | None = None) -> Reservation:
        """Hold blocks for the prompt's KV. Raises IncompatibleKVError on a
        mismatched pair, OutOfBlocksError when this engine cannot hold it."""
        self.layout.check_compatible(layout)
        eng = self.engine
        n = len(prompt_token_ids)
        need_total = n + (max_tokens or 1)
        if eng.kv.blocks_for(need_total) > eng.kv.num_blocks or need_total > eng.max_model_len:
            raise OutOfBlocksError(f"a sequence of {need_total} tokens can never fit this replica")
        hashes = block_hashes(prompt_token_ids, eng.cfg.block_size, eng.hash_salt)
        with self._lock:
            if handoff_id in self._open:
                raise InvalidRequestError(f"hand-off {handoff_id!r} is already reserved")
            eng.check_id_free(handoff_id)
            got = eng.kv.reserve(handoff_id, hashes, n)
            if got is None:
                raise OutOfBlocksError(
                    f"{eng.kv.num_free_blocks} free blocks cannot hold {eng.kv.blocks_for(n)}")
            ids, cached = got
            per_block = eng.runner.kv_cache[:, :, 0].numel() * eng.runner.kv_cache.element_size()
            sent_blocks = len(ids) - cached // eng.cfg.block_size
            r = Reservation(handoff_id, ids, n, cached,
                            time.monotonic() + (lease_s or self.lease_s),
                            bytes_allowed=per_block * sent_blocks)
            self._open[handoff_id] = r
            return r

    # KVSink
    def expect(self, handoff_id: str) -> int:
        with self._lock:
            r = self._open.get(handoff_id)
            if r is None or r.deadline < time.monotonic():
                raise UnknownHandoffError(f"no live reservation for hand-off {handoff_id!r}")
            return r.bytes_allowed

    def write_layers(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        with self._lock:
            r = self._open.get(header.handoff_id)
            if r is None:
                raise UnknownHandoffError(f"no live reservation for hand-off {header.handoff_id!r}")
            skip = r.cached_tokens // self.engine.cfg.block_size
            ids = r.block_ids[skip:]
            if buf.shape[2] != len(ids) or header.layer_end > self.layout.num_layers:
                raise MessageTooLarge(
                    f"hand-off {header.handoff_id!r}: chunk of shape {tuple(buf.shape)} does not fit "
                    f"{len(ids)} reserved blocks / {self.layout.num_layers} layers")
            if ids:
                idx = torch.tensor(ids, dtype=torch.int64, device=self.engine.device)
                ops.unpack_kv(buf, self.engine.runner.kv_cache, idx, header.layer_start)
            r.layers_received.update(range(header.layer_start, header.layer_end))

    def commit(self, meta: HandoffMeta, matcher=None) -> str:
        """Admit the received sequence into the running batch. Returns its
        request id. Raises if layers are missing. ``matcher``: its
        structured-output matcher, built beforehand (LLMEngine.build_matcher)."""
        eng = self.engine
        with self._lock:
            r = self._open.get(meta.request_id)
            if r is None:
                raise UnknownHandoffError(f"no live reservation for hand-off {meta.request_id!r}")
            missing = set(range(self.layout.num_layers)) - r.layers_received
            if missing and r.cached_tokens < r.num_tokens:
                raise IncompatibleKVError(
                    f"hand-off {meta.request_id!r} is missing layers {sorted(missing)[:8]}")
            del self._open[meta.request_id]
        return admit_imported(eng, meta, r.num_tokens, r.cached_tokens, matcher)

    def cancel(self, handoff_id: str) -> bool:
        with self._lock:
            r = self._open.pop(handoff_id, None)
            if r is not None:
                self.engine.kv.free(handoff_id)
            return r is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Free every reservation whose lease ran out. Returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [h for h, r in self._open.items() if r.deadline < now]
            for h in dead:
                del self._open[h]
                self.engine.kv.free(h)
        self.expired += len(dead)
        return dead

    def __len__(self) -> int:
        return len(self._open)


def admit_imported(engine, meta: HandoffMeta, num_tokens: int, cached_tokens: int,
                   matcher=None):
    """Turn held blocks (owned by ``meta.request_id``) into a running sequence
    whose prompt KV is computed and whose first token was sampled elsewhere.
    Returns (request id, RequestOutput of the first token)."""
    params = SamplingParams.from_dict(meta.params)
    rid = meta.request_id
    seq = engine.new_sequence(rid, meta.prompt_token_ids)
    seq.params = params
    seq.num_computed_tokens = num_tokens
    seq.num_cached_tokens = cached_tokens
    try:
        st = RequestState(seq, params, engine.tokenizer, engine.eos_token_ids,
                          engine.max_model_len, engine.grammar, matcher)
    except BaseException:
        engine.kv.free(rid)  # the reservation's blocks: nothing else will free them
        raise
    engine.requests[rid] = st
    if meta.prompt_logprobs is not None and st.prompt_logprobs is not None:
        st.prompt_logprobs = [_lp_from_dict(d) for d in meta.prompt_logprobs]
    out, reason = st.on_token(meta.first_token_id, _lp_from_dict(meta.first_logprobs))
    seq.first_token_time = time.monotonic()
    engine.kv.cache_full_blocks(seq)
    if reason is not None:
        engine.scheduler.finish(seq, reason)
        del engine.requests[rid]
    else:
        engine.scheduler.add_running(seq)
    return rid, out


def import_kv(engine, meta: HandoffMeta, buf: torch.Tensor) -> tuple[str, Any]:
    """One-shot import of a whole export (all layers) — the in-process path."""
    res = Reservations(engine)
    params = SamplingParams.from_dict(meta.params)
    res.reserve(meta.request_id, meta.layout, meta.prompt_token_ids, params.max_tokens)
    r = res._open[meta.request_id]
    skip = r.cached_tokens // engine.cfg.block_size
    header = ChunkHeader(meta.request_id, 0, meta.layout.num_layers, tuple(buf.shape),
                         DTYPE_NAMES.get(buf.dtype, str(buf.dtype)), buf.numel() * buf.element_size(), 0)
    res.write_layers(header, buf[:, :, skip:])
    return res.commit(meta)
