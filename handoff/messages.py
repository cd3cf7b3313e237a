"""Every message of the worker RPC plane (``splitserve.handoff.rpc``).

The ingress-side orchestrator, the decode workers and the prefill workers
import these same types. They travel as msgpack and are decoded with
``msgspec.msgpack.Decoder(Type)``: a missing, mistyped or unknown field
fails the call (INVALID_ARGUMENT) instead of becoming a default. Fields
with a default are optional by design and say so.

  Generate (ingress -> decode, a stream)
    GenerateRequest  ->  GenerateOutput ... (the first one carries GenerateTimings)
  Prefill (decode -> prefill)
    PrefillRequest (with its PrefillTarget)  ->  PrefillReply (HandoffMeta, PrefillTimings)
  Stats (anyone -> a worker)
    StatsRequest  ->  the worker's stats
  any call that fails
    WorkerError in the gRPC status details (see ``splitserve.handoff.rpc_errors``)

Sampling parameters travel in the form of ``SamplingParams.to_dict``,
whose ``from_dict`` refuses unknown keys and validates every value.

Bounds: every list, map and string a sender controls has a maximum length
(the ``Annotated[..., Meta(...)]`` aliases below: ``TokenIds``, ``Id``,
``SamplingParamsWire``, ...; checked by the decoder before it reads the items),
maps appear only where a sampling parameter needs one, and each method
bounds its request's bytes (``Method.max_request_bytes``, checked on the raw
bytes before decoding). So a message decodes into memory of the order of its
own size, never the hundreds of times its size that nested empty maps in a
free-form field would make.
``KVLayout`` (the pair's compatibility handshake) is the transfer plane's
type, ``splitserve.handoff.transfer.base.KVLayout``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, NamedTuple, Union

import msgspec
import torch
from msgspec import Meta

from splitserve.engine.kv_port import AdapterRef, FinishReason, TokenLogprobs
from splitserve.engine.outputs import RequestOutput
from splitserve.handoff.tracing import MAX_TRACEPARENT_CHARS
from splitserve.handoff.transfer.base import KVLayout


# -- bounds -------------------------------------------------------------------------
MAX_PROMPT_TOKENS = 1 << 20  # past any served context; the engine checks its own limit
MAX_ID_CHARS = 1024  # request and hand-off ids, addresses, endpoints
MAX_PARAMS = 64  # keys of SamplingParams.to_dict (it has 24 fields)
MAX_PARAM_ITEMS = 4096  # items of one list parameter: stop, stop_token_ids, logit_bias pairs
MAX_PARAM_CHARS = 1 << 20  # one string parameter, e.g. a structured-output grammar
MAX_TOP_LOGPROBS = 64  # alternatives per token (SamplingParams allows 20)
MAX_PROMPT_BYTES = 8 << 20  # a request with a prompt: 5 bytes per token id, plus parameters
MAX_CONTROL_BYTES = 1 << 10  # a request without one

TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
TokenIds = Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]
Id = Annotated[str, Meta(max_length=MAX_ID_CHARS)]
# a W3C trace context (splitserve.handoff.tracing); None: the call is not traced
TraceParent = Annotated[str, Meta(max_length=MAX_TRACEPARENT_CHARS)]
_Key = Annotated[str, Meta(max_length=64)]
_Text = Annotated[str, Meta(max_length=MAX_PARAM_CHARS)]
_Scalar = Union[None, bool, int, float, _Text]
_ParamValue = Union[
    _Scalar,
    # a list of scalars or of [token id, bias] pairs (logit_bias)
    Annotated[list[Union[_Scalar, Annotated[list[_Scalar], Meta(max_length=2)]]],
              Meta(max_length=MAX_PARAM_ITEMS)],
    Annotated[dict[_Key, _Text], Meta(max_length=8)],  # structured_output
]
SamplingParamsWire = Annotated[dict[_Key, _ParamValue], Meta(max_length=MAX_PARAMS)]


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every worker RPC message."""


class Logprob(Message):
    """One token's logprob and its most probable alternatives."""

    token_id: TokenId
    logprob: float
    # (token id, logprob), most probable first
    top: Annotated[list[tuple[TokenId, float]], Meta(max_length=MAX_TOP_LOGPROBS)]

    @classmethod
    def of(cls, lp: TokenLogprobs | None) -> "Logprob | None":
        return None if lp is None else cls(token_id=lp.token_id, logprob=lp.logprob,
                                           top=[(int(t), float(v)) for t, v in lp.top])

    @staticmethod
    def to_engine(lp: "Logprob | None") -> TokenLogprobs | None:
        return None if lp is None else TokenLogprobs(lp.token_id, lp.logprob, list(lp.top))


class Adapter(Message):
    """The LoRA adapter a request runs with (``AdapterRef`` on the wire):
    every replica that computes its KV applies it, loading it from ``path``
    when it has not yet, and checks the files against ``digest``."""

    name: Id
    path: Annotated[str, Meta(max_length=4096)]
    digest: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]

    @classmethod
    def of(cls, ref: AdapterRef | None) -> "Adapter | None":
        return None if ref is None else cls(name=ref.name, path=ref.path, digest=ref.digest)

    @staticmethod
    def to_engine(a: "Adapter | None") -> AdapterRef | None:
        return None if a is None else AdapterRef(a.name, a.path, a.digest)


# a hybrid model's recurrent states of one sequence, over every recurrent layer (Qwen3-Next-80B:
# 74 MiB, Jamba 1.5 Large: 63 MiB), where they ride in the reply (models without attention
# layers; the others send them as a KV chunk); within the reply's bound (rpc.MAX_REPLY_BYTES)
MAX_STATE_BYTES = 192 << 20
_STATE_DTYPES = ("float32", "bfloat16", "float16")


class StateTensor(Message):
    """One kind of a hybrid model's recurrent state (``KVPort.export_state``):
    [state layers, *shape] of ``dtype``, raw little-endian bytes."""

    name: Annotated[str, Meta(max_length=64)]
    dtype: Annotated[str, Meta(max_length=16)]
    shape: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(max_length=8)]
    data: Annotated[bytes, Meta(max_length=MAX_STATE_BYTES)]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "StateTensor":
        t = t.detach().to("cpu").contiguous()
        return cls(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                   data=t.view(torch.uint8).numpy().tobytes())

    def to_tensor(self) -> torch.Tensor:
        """The tensor; ValueError when the bytes do not match the dtype and shape."""
        if self.dtype not in _STATE_DTYPES:
            raise ValueError(f"state {self.name!r}: dtype {self.dtype!r} is not one of {_STATE_DTYPES}")
        dtype = getattr(torch, self.dtype)
        n = dtype.itemsize
        for d in self.shape:
            n *= d
        if n != len(self.data):
            raise ValueError(f"state {self.name!r}: {len(self.data)} bytes for shape {self.shape} "
                             f"of {self.dtype}")
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(dtype).reshape(self.shape)


# -- Prefill ------------------------------------------------------------------------
class HandoffMeta(Message):
    """Everything the target needs besides the KV bytes."""

    request_id: Id
    layout: KVLayout
    prompt_token_ids: TokenIds
    first_token_id: TokenId
    params: SamplingParamsWire  # SamplingParams.to_dict
    first_logprobs: Logprob | None
    # where asked for: [None, logprobs of prompt token 1, ...]
    prompt_logprobs: Annotated[list[Logprob | None], Meta(max_length=MAX_PROMPT_TOKENS)] | None
    adapter: Adapter | None = None  # the KV was computed with it; None: the base model
    # a hybrid model's recurrent states after the prompt; None: the model keeps none
    state: Annotated[list[StateTensor], Meta(max_length=8)] | None = None


class PrefillTarget(Message):
    """Where the KV goes: the decode replica's KV endpoint and reservation."""

    endpoint: Id
    # a prefix the target caches already: whole blocks, not sent
    skip_tokens: Annotated[int, Meta(ge=0)]
    layout: KVLayout  # the target's: KVLayout.check_compatible with the prefill engine's


class PrefillRequest(Message):
    request_id: Id  # also the hand-off id of the target's reservation
    prompt_token_ids: TokenIds
    params: SamplingParamsWire  # SamplingParams.to_dict
    target: PrefillTarget
    adapter: Adapter | None = None  # None: the base model
    traceparent: TraceParent | None = None  # the decode replica's hand-off span


class PrefillTimings(Message):
    prefill_s: float  # from the call to the first token
    prefill_queue_s: float  # of which waiting in the engine's queue
    transfer_wait_s: float  # from the first token to the last chunk's ack
    bytes: int  # KV bytes sent


class PrefillReply(Message):
    meta: HandoffMeta
    timings: PrefillTimings
    # prompt tokens the prefill engine took from its own prefix cache instead
    # of computing (whole blocks, a prefix of the prompt); a default, so a
    # reply from a replica that does not report it decodes, as 0
    cached_tokens: Annotated[int, Meta(ge=0, le=MAX_PROMPT_TOKENS)] = 0


# -- Generate -----------------------------------------------------------------------
class PrefillPlacement(Message):
    address: Id  # the prefill replica's worker RPC address


class GenerateRequest(Message):
    request_id: Id
    prompt_token_ids: TokenIds
    params: SamplingParamsWire  # SamplingParams.to_dict
    prefill: PrefillPlacement | None  # None: prefill on the decode replica
    adapter: Adapter | None = None  # None: the base model
    traceparent: TraceParent | None = None  # the ingress request's span


class PrefillMode(str, enum.Enum):
    LOCAL = "local"  # the decode replica ran the prompt itself
    REMOTE = "remote"  # a prefill replica ran it and sent the KV


class GenerateTimings(Message):
    """How the first token came about; optional fields belong to one mode."""

    mode: PrefillMode
    ttft_s: float  # from the Generate call to the first token
    local_queue_s: float | None = None  # local: waiting in the engine's queue
    fallback_reason: str | None = None  # local after a failed hand-off: why
    handoff_s: float | None = None  # remote: the Prefill call, transfer included
    prefill_s: float | None = None  # remote: PrefillTimings, as reported
    prefill_queue_s: float | None = None
    transfer_wait_s: float | None = None
    bytes: int | None = None


class GenerateOutput(Message):
    """One step of a request's stream (``RequestOutput`` in wire form)."""

    request_id: Id
    token_ids: TokenIds
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: Annotated[list[Logprob], Meta(max_length=MAX_PROMPT_TOKENS)] | None = None
    # first output only, when asked for
    prompt_logprobs: Annotated[list[Logprob | None],
                               Meta(max_length=MAX_PROMPT_TOKENS)] | None = None
    timings: GenerateTimings | None = None  # first output only

    @classmethod
    def of(cls, out: RequestOutput, timings: GenerateTimings | None = None) -> "GenerateOutput":
        return cls(
            request_id=out.request_id, token_ids=list(out.new_token_ids), text=out.new_text,
            finished=out.finished,
            finish_reason=None if out.finish_reason is None else FinishReason(out.finish_reason),
            prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
            logprobs=[Logprob.of(lp) for lp in out.new_logprobs] if out.new_logprobs else None,
            prompt_logprobs=None if out.prompt_logprobs is None
            else [Logprob.of(lp) for lp in out.prompt_logprobs],
            timings=timings)


# -- Stats, errors ------------------------------------------------------------------
class StatsRequest(Message):
    pass


class ErrorKind(str, enum.Enum):
    """What failed on the worker; each maps to one exception class
    (``splitserve.handoff.rpc_errors``)."""

    INVALID_REQUEST = "invalid_request"
    OUT_OF_BLOCKS = "out_of_blocks"
    INCOMPATIBLE_KV = "incompatible_kv"
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # this replica cannot load the request's adapter
    UNKNOWN_HANDOFF = "unknown_handoff"
    TRANSFER_TIMEOUT = "transfer_timeout"
    MESSAGE_TOO_LARGE = "message_too_large"
    TRANSFER_AUTH = "transfer_auth"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    PEER_UNAVAILABLE = "peer_unavailable"
    INVALID_CHUNK = "invalid_chunk"
    TRANSFER_FAILED = "transfer_failed"
    TIMEOUT = "timeout"
    UNAUTHENTICATED = "unauthenticated"  # the worker refused the cluster token
    UPSTREAM = "upstream"  # a call this worker made failed without a kind
    REQUEST_FAILED = "request_failed"  # the engine failed this request alone, and goes on
    ENGINE_DEAD = "engine_dead"  # the worker's engine stopped (broken or shutting down)
    INTERNAL = "internal"  # anything else: a bug in the worker


class WorkerError(Message):
    kind: ErrorKind
    message: str
    param: str | None  # INVALID_REQUEST: the offending parameter, when known


# -- the methods --------------------------------------------------------------------
class Method(NamedTuple):
    name: str
    request: Any  # a Message type
    reply: Any  # a Message type, or what the worker's stats are
    streaming: bool
    max_request_bytes: int  # a larger request is refused (RESOURCE_EXHAUSTED) undecoded


PREFILL = Method("Prefill", PrefillRequest, PrefillReply, False, MAX_PROMPT_BYTES)
GENERATE = Method("Generate", GenerateRequest, GenerateOutput, True, MAX_PROMPT_BYTES)
# the workers' stats methods own their reply's shape
STATS = Method("Stats", StatsRequest, dict[str, Any], False, MAX_CONTROL_BYTES)
METHODS = {m.name: m for m in (PREFILL, GENERATE, STATS)}
