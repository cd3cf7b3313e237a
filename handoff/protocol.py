"""KV hand-off between engine instances, over each engine's ``KVPort``.

Source (prefill role): a ``prefill_only`` request finishes with its blocks
held; ``export_meta`` describes it as a wire ``HandoffMeta`` and the port's
``export_layers`` packs any layer range of its blocks into one buffer.

Target (decode role): ``Reservations.reserve`` holds blocks for an incoming
sequence under a hand-off id with a lease; received layer groups are written
straight into those blocks (``write_layers``: this table is the transports'
``KVSink``); ``commit`` turns the reservation into a running sequence that
continues exactly as if this engine had run the prefill. ``cancel`` and
lease expiry free the blocks.

Nothing here touches an engine but through ``splitserve.engine.kv_port``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from splitserve.engine.errors import IncompatibleKVError, InvalidRequestError
from splitserve.engine.kv_port import AdapterRef, BlockReservation, HandoffSequence, KVPort
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.handoff.messages import MAX_STATE_BYTES, Adapter, HandoffMeta, Logprob, StateTensor
from splitserve.handoff.transfer.base import ChunkHeader, KVLayout, KVSink
from splitserve.handoff.transfer.errors import MessageTooLarge, UnknownHandoffError


def layout_of(port: KVPort) -> KVLayout:
    """The engine's KV layout, as the pair's handshake compares it."""
    s = port.spec()
    return KVLayout(model_id=s.model_id, dtype=s.dtype, kv_dtype=s.kv_dtype,
                    block_size=s.block_size, num_layers=s.num_layers,
                    num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                    tensor_parallel_size=s.tensor_parallel_size,
                    kv_head_start=0, kv_head_end=s.num_kv_heads)  # whole heads at any TP degree


def engine_layout(engine) -> KVLayout:
    """``layout_of(engine.kv_port)``, for callers holding an ``LLMEngine``."""
    return layout_of(engine.kv_port)


def check_state_fits(port: KVPort) -> None:
    """Raise IncompatibleKVError where a sequence's recurrent states exceed
    what a hand-off reply carries, for a model whose states ride in the
    reply (one without attention layers, ``states_by_chunk``): such a model
    is served by colocated replicas only."""
    s = port.spec()
    if s.state_bytes > MAX_STATE_BYTES and not states_by_chunk(port):
        raise IncompatibleKVError(
            f"{s.model_id}: a sequence's recurrent states take {s.state_bytes >> 20} MiB, over the "
            f"{MAX_STATE_BYTES >> 20} MiB a prefill->decode hand-off carries; serve this model "
            "colocated")


# -- source side ----------------------------------------------------------------
def states_by_chunk(port: KVPort) -> bool:
    """Whether a hand-off of this engine's model sends its recurrent states
    as one chunk after the KV layers (over the KV transport, NCCL where
    configured): a hybrid model with attention layers. A model without
    (pure Mamba) hands off no block at all: its states ride in the reply."""
    s = port.spec()
    return bool(s.state_bytes) and s.num_layers > 0


def state_chunk(port: KVPort, request_id: str) -> torch.Tensor:
    """The finished prefill ``request_id``'s recurrent states as one chunk's
    buffer: every kind's bytes in name order (the ``state_shapes`` layout),
    [1, state_bytes] uint8 (engine thread)."""
    states = port.export_state(request_id)
    return torch.cat([states[name].contiguous().flatten().view(torch.uint8)
                      for name in sorted(states)])[None]


def states_of_chunk(port: KVPort, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state_chunk``'s buffer back as name -> whole states (copies, each
    aligned for its dtype: ``buf`` may be a receiver's reused buffer).
    Raises IncompatibleKVError when its size is not this model's."""
    s = port.spec()
    flat = buf.reshape(-1)
    if flat.numel() != s.state_bytes:
        raise IncompatibleKVError(f"a state chunk of {flat.numel()} bytes; this model's states "
                                  f"take {s.state_bytes}")
    out, at = {}, 0
    for name, shape, dtype in sorted(s.state_shapes):
        dt = getattr(torch, dtype)
        n = math.prod(shape) * dt.itemsize
        out[name] = flat[at:at + n].clone().view(dt).view(shape)
        at += n
    return out


def export_meta(port: KVPort, request_id: str, with_states: bool = True) -> HandoffMeta:
    """The finished prefill ``request_id`` in wire form (engine thread);
    ``with_states``: its recurrent states in it (else they went as a chunk:
    ``state_chunk``)."""
    seq = port.export_sequence(request_id)
    states = port.export_state(request_id) if with_states else None
    return HandoffMeta(
        request_id=seq.request_id, layout=layout_of(port),
        prompt_token_ids=list(seq.prompt_token_ids), first_token_id=seq.first_token_id,
        params=seq.params.to_dict(), first_logprobs=Logprob.of(seq.first_logprobs),
        prompt_logprobs=None if seq.prompt_logprobs is None
        else [Logprob.of(lp) for lp in seq.prompt_logprobs],
        adapter=Adapter.of(seq.adapter),
        state=None if states is None else [StateTensor.of(n, t) for n, t in states.items()])


def sequence_of(meta: HandoffMeta) -> HandoffSequence:
    """What the target engine admits, from the wire form (params validated)."""
    return HandoffSequence(
        request_id=meta.request_id, prompt_token_ids=list(meta.prompt_token_ids),
        first_token_id=meta.first_token_id, params=SamplingParams.from_dict(meta.params),
        first_logprobs=Logprob.to_engine(meta.first_logprobs),
        prompt_logprobs=None if meta.prompt_logprobs is None
        else [Logprob.to_engine(lp) for lp in meta.prompt_logprobs],
        adapter=Adapter.to_engine(meta.adapter))


# -- target side ----------------------------------------------------------------
@dataclass
class _Lease:
    blocks: BlockReservation
    deadline: float
    bytes_allowed: int
    adapter: AdapterRef | None  # the adapter the reserved prefix was matched under
    layers_received: set[int] = field(default_factory=set)
    # the state chunk's states (``states_of_chunk``), once arrived
    states: dict[str, torch.Tensor] | None = None


class Reservations(KVSink):
    """The target engine's open hand-offs. Thread-safe: transports write from
    their own threads while the engine loop commits. Every other method
    runs on the engine thread."""

    def __init__(self, port: KVPort, lease_s: float = 30.0):
        self.port = port
        self.lease_s = lease_s
        self.layout = layout_of(port)
        # a hybrid's states arrive as one more chunk (``states_by_chunk``): their bytes; 0: none
        self._chunk_state_bytes = port.spec().state_bytes if states_by_chunk(port) else 0
        self._open: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        port.add_reservation_holder(self)  # an engine abort cancels here

    def reserve(self, handoff_id: str, layout: KVLayout, prompt_token_ids: list[int],
                max_tokens: int | None, adapter: AdapterRef | None = None) -> BlockReservation:
        """Hold blocks for the prompt's KV, computed with ``adapter``. Raises
        IncompatibleKVError on a mismatched pair, OutOfBlocksError when this
        engine cannot hold it, AdapterUnavailableError when it cannot load
        the adapter."""
        self.layout.check_compatible(layout)
        with self._lock:
            if handoff_id in self._open:
                raise InvalidRequestError(f"hand-off {handoff_id!r} is already reserved")
            r = self.port.reserve(handoff_id, prompt_token_ids, max_tokens, adapter)
            self._open[handoff_id] = _Lease(r, time.monotonic() + self.lease_s,
                                            r.bytes_to_receive + self._chunk_state_bytes, adapter)
            return r

    def _live(self, handoff_id: str) -> _Lease:
        lease = self._open.get(handoff_id)
        if lease is None:
            raise UnknownHandoffError(f"no live reservation for hand-off {handoff_id!r}")
        return lease

    # KVSink
    def expect(self, handoff_id: str) -> int:
        with self._lock:
            lease = self._live(handoff_id)
            if lease.deadline < time.monotonic():
                raise UnknownHandoffError(f"no live reservation for hand-off {handoff_id!r}")
            return lease.bytes_allowed

    def write_layers(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        if header.layer_start == self.layout.num_layers and self._chunk_state_bytes:
            self._write_states(header, buf)
            return
        with self._lock:
            lease = self._live(header.handoff_id)
            n = len(lease.blocks.blocks_to_receive)
            if buf.shape[2] != n or header.layer_end > self.layout.num_layers:
                raise MessageTooLarge(
                    f"hand-off {header.handoff_id!r}: chunk of shape {tuple(buf.shape)} does not fit "
                    f"{n} reserved blocks / {self.layout.num_layers} layers")
            self.port.import_layers(lease.blocks, header.layer_start, buf)
            lease.layers_received.update(range(header.layer_start, header.layer_end))

    def _write_states(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        """The state chunk (the one past the last KV layer): kept until the
        commit imports it on the engine thread (``buf`` is the receiver's)."""
        want = self._chunk_state_bytes
        if header.layer_end != header.layer_start + 1 or buf.numel() * buf.element_size() != want:
            raise MessageTooLarge(f"hand-off {header.handoff_id!r}: a state chunk of "
                                  f"{buf.numel() * buf.element_size()} bytes; this model's states "
                                  f"take {want}")
        states = states_of_chunk(self.port, buf.view(torch.uint8))  # copied out of the buffer
        with self._lock:
            self._live(header.handoff_id).states = states

    def commit(self, meta: HandoffMeta, matcher=None) -> RequestOutput:
        """Admit the received sequence into the running batch. Returns its
        first output. Raises if layers are missing. ``matcher``: its
        structured-output matcher, built beforehand (LLMEngine.build_matcher)."""
        with self._lock:
            lease = self._live(meta.request_id)
            r = lease.blocks
            missing = set(range(self.layout.num_layers)) - lease.layers_received
            sent = Adapter.to_engine(meta.adapter)
            if sent != lease.adapter:
                del self._open[meta.request_id]
                self.port.cancel(r.handoff_id)
                raise IncompatibleKVError(
                    f"hand-off {meta.request_id!r}: KV computed with adapter "
                    f"{sent.name if sent else None!r}, reserved for "
                    f"{lease.adapter.name if lease.adapter else None!r}")
            if missing and r.cached_tokens < r.num_tokens:
                raise IncompatibleKVError(
                    f"hand-off {meta.request_id!r} is missing layers {sorted(missing)[:8]}")
            del self._open[meta.request_id]
        try:
            seq = sequence_of(meta)
            self._import_state(r, meta, lease.states)
        except BaseException:
            self.port.cancel(r.handoff_id)
            raise
        return self.port.admit(r, seq, matcher)

    def _import_state(self, r: BlockReservation, meta: HandoffMeta,
                      chunk: dict[str, torch.Tensor] | None) -> None:
        """A hybrid model's recurrent states into the reservation's slot, from
        the state chunk (``chunk``) or the reply; an IncompatibleKVError when
        they are missing, unexpected or misshapen."""
        kinds = self.port.spec().state_kinds
        if chunk is not None and meta.state is None:
            try:
                self.port.import_state(r, chunk)
            except ValueError as e:
                raise IncompatibleKVError(f"hand-off {meta.request_id!r}: {e}") from None
            return
        sent = tuple(s.name for s in meta.state or ())
        if sorted(sent) != sorted(kinds):
            raise IncompatibleKVError(f"hand-off {meta.request_id!r} carries recurrent states "
                                      f"{list(sent)}, this engine keeps {list(kinds)}")
        if not kinds:
            return
        try:
            self.port.import_state(r, {s.name: s.to_tensor() for s in meta.state})
        except ValueError as e:
            raise IncompatibleKVError(f"hand-off {meta.request_id!r}: {e}") from None

    def cancel(self, handoff_id: str) -> bool:
        with self._lock:
            lease = self._open.pop(handoff_id, None)
            if lease is not None:
                self.port.cancel(handoff_id)
            return lease is not None

    def expire(self) -> list[str]:
        """Free every reservation whose lease ran out. Returns their ids."""
        now = time.monotonic()
        with self._lock:
            dead = [h for h, lease in self._open.items() if lease.deadline < now]
            for h in dead:
                del self._open[h]
                self.port.cancel(h)
        return dead

    def __len__(self) -> int:
        return len(self._open)
