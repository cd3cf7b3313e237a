"""vLLM's metric names for splitserve's numbers, so autoscaling rules (KEDA,
HPA through prometheus-adapter) and gateways written against a vLLM server
work against splitserve's /metrics (``observability.vllm_metric_names``).

Each alias copies a splitserve family under vLLM's name, its ``model``
label renamed ``model_name`` (vLLM's); other labels stay (``role`` and
``replica`` on replica metrics: vLLM exports one series per engine too).
The table is documented in docs/operators.md ("vLLM metric names"); where
the meaning differs from vLLM's, the note says how.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric


@dataclass(frozen=True)
class VllmAlias:
    vllm: str  # vLLM's family name (a counter's without ``_total``)
    source: str  # the splitserve family it copies
    only: dict[str, str] = field(default_factory=dict)  # keep series with these labels (dropped)
    rename: dict[str, str] = field(default_factory=dict)  # label renames besides model
    note: str = ""


VLLM_ALIASES: tuple[VllmAlias, ...] = (
    VllmAlias("vllm:time_to_first_token_seconds", "splitserve_ttft_seconds"),
    VllmAlias("vllm:e2e_request_latency_seconds", "splitserve_e2e_seconds"),
    VllmAlias("vllm:inter_token_latency_seconds", "splitserve_itl_seconds"),
    VllmAlias("vllm:time_per_output_token_seconds", "splitserve_itl_seconds",
              note="vLLM's older name of the inter-token latency"),
    VllmAlias("vllm:request_time_per_output_token_seconds", "splitserve_tpot_seconds"),
    VllmAlias("vllm:request_queue_time_seconds", "splitserve_request_phase_seconds",
              only={"phase": "queue"}),
    VllmAlias("vllm:request_prefill_time_seconds", "splitserve_request_phase_seconds",
              only={"phase": "prefill"}, note="the hand-off is a phase of its own"),
    VllmAlias("vllm:request_decode_time_seconds", "splitserve_request_phase_seconds",
              only={"phase": "decode"}),
    VllmAlias("vllm:request_prompt_tokens", "splitserve_request_prompt_tokens"),
    VllmAlias("vllm:request_generation_tokens", "splitserve_request_output_tokens"),
    VllmAlias("vllm:prompt_tokens", "splitserve_prompt_tokens"),
    VllmAlias("vllm:generation_tokens", "splitserve_output_tokens"),
    VllmAlias("vllm:request_success", "splitserve_finished_requests",
              rename={"finish_reason": "finished_reason"}, note="label finished_reason: stop, length"),
    VllmAlias("vllm:prefix_cache_queries", "splitserve_prompt_tokens",
              note="prompt tokens, as vLLM counts queried tokens (cluster-wide, from the "
                   "ingress)"),
    VllmAlias("vllm:prefix_cache_hits", "splitserve_cached_prompt_tokens",
              note="prompt tokens served from a prefix cache"),
    VllmAlias("vllm:num_requests_running", "splitserve_running_seqs",
              note="per replica, labels role and replica: filter role for one pool"),
    VllmAlias("vllm:num_requests_waiting", "splitserve_waiting_requests",
              note="per replica, as above"),
    VllmAlias("vllm:kv_cache_usage_perc", "splitserve_kv_cache_usage_ratio",
              note="0..1, as in vLLM despite the name"),
    VllmAlias("vllm:gpu_cache_usage_perc", "splitserve_kv_cache_usage_ratio",
              note="vLLM's older name"),
    VllmAlias("vllm:num_preemptions", "splitserve_preemptions"),
    VllmAlias("vllm:spec_decode_num_drafts", "splitserve_spec_decode_drafts",
              note="per replica, from the first verify step on"),
    VllmAlias("vllm:spec_decode_num_draft_tokens", "splitserve_spec_decode_draft_tokens",
              note="per replica, as above"),
    VllmAlias("vllm:spec_decode_num_accepted_tokens", "splitserve_spec_decode_accepted_tokens",
              note="per replica, as above"),
)


def _alias(a: VllmAlias, src: Metric) -> Metric:
    out = Metric(a.vllm, src.documentation, src.type, src.unit)
    renames = {"model": "model_name", **a.rename}
    for s in src.samples:
        if any(s.labels.get(k) != v for k, v in a.only.items()):
            continue
        labels = {renames.get(k, k): v for k, v in s.labels.items() if k not in a.only}
        out.add_sample(a.vllm + s.name[len(src.name):], labels, s.value, s.timestamp, s.exemplar)
    return out


def vllm_families(families: list[Metric]) -> list[Metric]:
    """The vLLM-named copies of ``families`` (splitserve families)."""
    by_name = {f.name: f for f in families}
    return [_alias(a, by_name[a.source]) for a in VLLM_ALIASES if a.source in by_name]
