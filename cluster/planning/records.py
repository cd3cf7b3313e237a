"""The rows of the profile database as typed values.

``StepSample`` is one engine step: its mix of work (the step-time model's
inputs) and how long it took. ``EngineSettings`` is what of an engine's
configuration changes its speed; profiles are keyed by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MEASURED = "measured"
DERIVED = "derived"
PROVENANCES = (MEASURED, DERIVED)


@dataclass(frozen=True)
class EngineSettings:
    dtype: str = "bfloat16"  # weights and activations
    kv_dtype: str = "bfloat16"  # KV cache elements (fp8 halves KV bytes)
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024  # the step token budget, i.e. the prefill chunk size
    kernel_backend: str = "auto"  # triton | reference | cpu | auto
    device: str = "cuda"
    tensor_parallel: int = 1  # devices of one replica

    @property
    def key(self) -> str:
        return (f"{self.device}/{self.dtype}/kv-{self.kv_dtype}/bs{self.block_size}/"
                f"seqs{self.max_num_seqs}/tok{self.max_num_batched_tokens}/"
                f"{self.kernel_backend}/tp{self.tensor_parallel}")

    @property
    def speed_key(self) -> str:
        """What changes a step's time for a given mix of work: batch caps
        only bound which mixes occur, so measurements are shared across them."""
        return f"{self.device}/{self.dtype}/kv-{self.kv_dtype}/{self.kernel_backend}/tp{self.tensor_parallel}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepSample:
    """One engine step. Prefill chunks contribute ``prefill_tokens`` (new
    prompt tokens) and ``prefill_attn`` (query-key pairs their causal
    attention computes: a chunk of n tokens after c cached ones adds
    n * (c + (n + 1) / 2)); decoding sequences contribute one token each and
    ``decode_context``, the sum of their attention lengths."""

    prefill_tokens: int
    prefill_attn: float
    prefill_seqs: int
    decode_seqs: int
    decode_context: int
    step_s: float
    repeats: int = 1
    std_s: float = 0.0

    def features(self) -> tuple[float, float, float, float]:
        return (float(self.prefill_tokens), float(self.prefill_attn), float(self.decode_seqs),
                float(self.decode_context))


def chunk_attn(num_new: int, num_cached: int) -> float:
    """Query-key pairs of a causal prefill chunk of ``num_new`` tokens after
    ``num_cached`` tokens already in the cache."""
    return num_new * (num_cached + (num_new + 1) / 2)
