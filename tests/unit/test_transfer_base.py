"""The transfer seam: layouts, headers, checks, config, registry, buffers."""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch

from splitserve.engine.errors import IncompatibleKVError
from splitserve.handoff.transfer import chunks
from splitserve.handoff.transfer.base import (ChunkHeader, KVLayout, KVReceiver, KVSender, TransportConfig,
                                  get_transport, make_header)
from splitserve.handoff.transfer.buffers import BufferPool
from splitserve.handoff.transfer.errors import InvalidChunkError, MessageTooLarge, TransferError
from tests.unit.transfer_sinks import RecordingSink

LAYOUT = KVLayout("Qwen/Qwen3-0.6B", "bfloat16", "bfloat16", 16, 28, 8, 128)


def test_layout_mismatch_names_each_differing_field():
    LAYOUT.check_compatible(KVLayout.from_dict(LAYOUT.to_dict()))
    other = KVLayout("Qwen/Qwen3-0.6B", "bfloat16", "float8_e4m3fn", 32, 28, 8, 128)
    with pytest.raises(IncompatibleKVError) as info:
        LAYOUT.check_compatible(other)
    msg = str(info.value)
    assert "kv_dtype: 'bfloat16' != 'float8_e4m3fn'" in msg
    assert "block_size: 16 != 32" in msg
    for same in ("model_id", "num_layers", "num_kv_heads", "head_dim", "layout:"):
        assert same not in msg


def test_layout_dict_round_trip_and_default_version():
    d = LAYOUT.to_dict()
    assert d == {"model_id": "Qwen/Qwen3-0.6B", "dtype": "bfloat16", "kv_dtype": "bfloat16",
                 "block_size": 16, "num_layers": 28, "num_kv_heads": 8, "head_dim": 128,
                 "layout": "L2NBHD-v1", "tensor_parallel_size": 1, "kv_head_start": 0,
                 "kv_head_end": 0}
    for optional in ("layout", "tensor_parallel_size", "kv_head_start", "kv_head_end"):
        del d[optional]
    assert KVLayout.from_dict(d) == LAYOUT
    with pytest.raises(IncompatibleKVError, match="layout: 'L2NBHD-v1' != 'L2NBHD-v2'"):
        LAYOUT.check_compatible(KVLayout.from_dict({**d, "layout": "L2NBHD-v2"}))


def test_layouts_pair_across_tp_degrees_when_they_carry_the_same_heads():
    # an older peer (no head range) carries every head, like a TP engine's rank 0
    tp2 = KVLayout.from_dict({**LAYOUT.to_dict(), "tensor_parallel_size": 2, "kv_head_end": 8})
    LAYOUT.check_compatible(tp2)
    tp2.check_compatible(LAYOUT)
    half = KVLayout.from_dict({**tp2.to_dict(), "kv_head_start": 4})
    with pytest.raises(IncompatibleKVError, match=r"KV heads carried: \(0, 8\) != \(4, 8\)"):
        LAYOUT.check_compatible(half)


def test_make_header_describes_the_buffer():
    buf = torch.arange(2 * 2 * 3 * 4 * 1 * 8, dtype=torch.float32).reshape(2, 2, 3, 4, 1, 8)
    h = make_header("req-7", 4, 6, buf.to(torch.bfloat16))
    raw = buf.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert h == ChunkHeader("req-7", 4, 6, (2, 2, 3, 4, 1, 8), "bfloat16", len(raw),
                            zlib.crc32(raw))


def test_make_header_rejects_inconsistent_or_empty_chunks():
    buf = torch.zeros(2, 2, 3, 4, 1, 8)
    with pytest.raises(InvalidChunkError, match="must lead with the layer count 3"):
        make_header("r", 0, 3, buf)
    with pytest.raises(InvalidChunkError, match="empty"):
        make_header("r", 2, 2, buf[:0])
    with pytest.raises(InvalidChunkError, match="empty or negative"):
        make_header("r", -1, 1, buf)
    with pytest.raises(InvalidChunkError, match="no bytes"):
        make_header("r", 0, 2, buf[:, :, :0])
    with pytest.raises(InvalidChunkError, match="empty handoff_id"):
        make_header("", 0, 2, buf)
    with pytest.raises(InvalidChunkError, match="cannot be transferred"):
        make_header("r", 0, 2, buf.to(torch.complex64))


def test_check_header_catches_a_lying_nbytes_and_bad_checksum():
    h = make_header("r", 0, 1, torch.zeros(1, 2, 1, 4, 1, 8, dtype=torch.float16))
    chunks.check_header(h)
    with pytest.raises(InvalidChunkError, match="holds 128"):
        chunks.check_header(ChunkHeader(**{**h.__dict__, "nbytes": 129}))
    with pytest.raises(InvalidChunkError, match="not a crc32"):
        chunks.check_header(ChunkHeader(**{**h.__dict__, "checksum": 1 << 32}))
    with pytest.raises(InvalidChunkError, match="is not one of"):
        chunks.check_header(ChunkHeader(**{**h.__dict__, "dtype": "float128"}))


def test_admit_bounds_a_chunk_by_the_reservation():
    sink = RecordingSink()
    h = make_header("r", 0, 1, torch.zeros(1, 2, 1, 4, 1, 8))
    sink.reserve("r", h.nbytes)
    chunks.admit(h, sink, require_checksum=True)
    sink.reserve("r", h.nbytes - 1)
    with pytest.raises(MessageTooLarge, match=f"{h.nbytes} bytes .* exceeds the {h.nbytes - 1}"):
        chunks.admit(h, sink, require_checksum=True)
    unchecked = ChunkHeader(**{**h.__dict__, "checksum": chunks.NO_CHECKSUM})
    with pytest.raises(InvalidChunkError, match="requires one"):
        chunks.admit(unchecked, sink, require_checksum=True)


def test_crc32_matches_zlib_whatever_implementation_is_loaded():
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8)
    raw = data.numpy().tobytes()
    assert chunks.crc32(data) == zlib.crc32(raw)
    assert chunks.crc32(memoryview(raw)[10:], chunks.crc32(memoryview(raw)[:10])) == zlib.crc32(raw)


def test_transport_config_validation():
    with pytest.raises(ValueError, match="token is empty"):
        TransportConfig(token="")
    with pytest.raises(ValueError, match="exceeds max_message_bytes"):
        TransportConfig(token="t", chunk_bytes=8 << 20, max_message_bytes=8 << 20)


def test_registry_and_identical_signatures():
    with pytest.raises(ValueError, match="'grpc', 'torch_dist', 'inproc'"):
        get_transport("carrier-pigeon")
    classes = {name: get_transport(name) for name in ("grpc", "torch_dist", "inproc")}
    for sender, receiver in classes.values():
        assert issubclass(sender, KVSender) and issubclass(receiver, KVReceiver)
    for method in ("__init__", "send", "ping", "close"):
        sigs = {inspect.signature(getattr(s, method)) for s, _ in classes.values()}
        assert sigs == {inspect.signature(getattr(KVSender, method))}, method
    for method in ("__init__", "start", "stop"):
        sigs = {inspect.signature(getattr(r, method)) for _, r in classes.values()}
        assert sigs == {inspect.signature(getattr(KVReceiver, method))}, method
    assert issubclass(InvalidChunkError, TransferError)


def test_buffer_pool_reuses_within_twice_the_size_and_bounds_its_total():
    pool = BufferPool(max_bytes=1000)
    a = pool.acquire(400)
    assert a.numel() == 400 and a.dtype == torch.uint8
    pool.release(a)
    assert pool.acquire(300) is a  # 400 <= 2 * 300
    pool.release(a)
    pool.release(a)  # a second release of the same buffer is ignored
    assert pool.cached_bytes == 400
    assert pool.acquire(100) is not a  # too wasteful: a stays pooled
    b = pool.acquire(500)
    pool.release(b)
    assert pool.cached_bytes == 900
    pool.release(torch.empty(300, dtype=torch.uint8))  # 1200 > 1000: the oldest (a) goes
    assert pool.cached_bytes == 800
    assert pool.acquire(400) is b  # the smallest that fits; a is gone
    pool.release(b)
    pool.release(torch.empty(2000, dtype=torch.uint8))  # larger than the pool: not kept
    assert pool.cached_bytes == 800
