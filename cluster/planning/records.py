"""The rows of the profile database as typed values.

``StepSample`` is one engine step: its mix of work (the step-time model's
inputs) and how long it took. ``EngineSettings`` is what of an engine's
configuration changes its speed; profiles are keyed by it. ``SpecAcceptance``
is how often one speculation method's drafts were accepted on one kind of
text.
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


SPEC_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpecAcceptance:
    """Speculative decoding's acceptance, measured for one (model, draft,
    workload, k).

    ``acceptance`` is the per-token rate of the model the planner and the
    simulator use (``sim.speculation``: each draft accepted with this
    chance while the ones before it were), fitted so that a verify step of
    ``k`` drafts yields the measured ``tokens_per_step``
    (``planning.acceptance.per_token_rate``). ``acceptance_rate`` (accepted
    over drafted tokens) and ``mean_accepted_length`` (1 + accepted drafts
    per verified sequence) are the engine's own counters
    (``engine.spec.decoder.SpecCounters``), as its metrics export them."""

    method: str  # ngram | draft
    draft: str  # the draft model's key (name@digest), or "ngram:MIN-MAX"
    workload: str  # code-edit | free | a named dataset
    k: int  # draft tokens per verify step (num_speculative_tokens, fixed)
    acceptance: float
    acceptance_rate: float
    mean_accepted_length: float
    draft_tokens: int  # draft tokens verified
    tokens_per_step: float  # output tokens per decoding sequence and step (0: unknown)
    steps: int  # sequence-steps behind tokens_per_step (0: unknown)
    dataset: str = ""  # the text the prompts came from
    source: str = ""  # what measured it: the profile run, or an imported record's path
    provenance: str = MEASURED

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculation method must be one of {SPEC_METHODS}, "
                             f"got {self.method!r}")
        if self.provenance not in PROVENANCES:
            raise ValueError(f"provenance must be one of {PROVENANCES}, got {self.provenance!r}")
        for name in ("acceptance", "acceptance_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
