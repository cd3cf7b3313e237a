"""The ``router`` and ``deadlines`` sections: request placement and how long
the ingress waits on a decode stream."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Mapping

from pydantic import Field, model_validator

from splitserve.router.config import ModelFacts, RouterConfig

from .base import _Strict


class DeadlineSpec(_Strict):
    """The ``deadlines`` section: how long the ingress waits on a decode
    replica's Generate stream. Past any of them the stream is cancelled
    (the workers abort the request and free its KV on both sides) and the
    client gets 504 / DEADLINE_EXCEEDED. The Prefill call's own deadline is
    ``transfer.prefill_timeout_s``."""

    first_output_s: float = Field(300.0, gt=0, description="Longest wait for a request's first "
                                  "token from its decode replica: queueing, remote prefill and "
                                  "KV hand-off included.")
    inter_token_s: float = Field(60.0, gt=0, description="Longest silence between two outputs "
                                 "of a decode stream.")
    per_token_s: float = Field(1.0, gt=0, description="A request's overall deadline is "
                                "first_output_s + per_token_s x its output tokens (max_tokens, "
                                "else the context left), at most max_request_s; resumes on "
                                "another replica share it.")
    max_request_s: float = Field(3600.0, gt=0, description="Cap of a request's overall "
                                 "deadline.")

    def overall_s(self, max_output_tokens: int) -> float:
        """The overall deadline of a request that may produce this many tokens."""
        return min(self.max_request_s, self.first_output_s + self.per_token_s * max_output_tokens)


# RouterConfig's defaults: the router section repeats none of them
_ROUTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterConfig)
                    if f.default is not dataclasses.MISSING}


class RouterSpec(_Strict):
    """The ``router`` section: the knobs of ``splitserve.router.config.RouterConfig``
    an operator sets, under its names and with its defaults, plus four that
    the replicas and the ingress read (``NOT_ROUTER_FIELDS``)."""

    NOT_ROUTER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"stats_period_s", "max_retries", "routers", "no_router_grace_s"})

    policy: Literal["cost", "prefix_aware", "least_loaded", "round_robin"] = Field(
        _ROUTER_DEFAULTS["policy"], description="Placement policy of (prefill, decode) pairs.")
    routers: int = Field(2, ge=1, le=16, description="Router actors. Each model is placed by "
                         "one of them at a time; the others hold the same replica stats and "
                         "prefixes and take over at once if it dies. More routers spread the "
                         "placements of several models.")
    max_queue_per_model: int = Field(_ROUTER_DEFAULTS["max_queue_per_model"], ge=1,
                                     description="Requests holding a slot per model (placed, or "
                                     "waiting in the router's queue) before new ones are refused "
                                     "(HTTP 429).")
    stats_period_s: float = Field(0.25, gt=0, description="How often replicas push their load "
                                  "to the router.")
    stats_ttl_s: float = Field(_ROUTER_DEFAULTS["stats_ttl_s"], gt=0, description="Stats older "
                               "than this make a replica ineligible; 3x this forgets it.")
    network_bytes_per_s: float = Field(_ROUTER_DEFAULTS["network_bytes_per_s"], gt=0,
                                       description="Bandwidth the cost model assumes for KV "
                                       "hand-offs.")
    local_prefill_max_tokens: int = Field(_ROUTER_DEFAULTS["local_prefill_max_tokens"], ge=0,
                                          description="Prompts up to this many uncached tokens "
                                          "may prefill on the decode replica.")
    max_retries: int = Field(2, ge=0, description="Other replica pairs tried after a refusal.")
    max_queue_delay_s: float = Field(_ROUTER_DEFAULTS["max_queue_delay_s"], ge=0,
                                     description="Longest a new request waits for a replica that "
                                     "can take it (in the router's queue, plus the predicted "
                                     "prefill queue) before it is refused with HTTP 429 and "
                                     "Retry-After; 0: until its client gives up.")
    max_resume_wait_s: float = Field(_ROUTER_DEFAULTS["max_resume_wait_s"], ge=0,
                                     description="Longest a stream resumed after its decode "
                                     "replica failed waits for another one. It goes ahead of new "
                                     "requests and max_queue_delay_s does not apply to it; past "
                                     "this it ends with a 429 error event; 0: until its client "
                                     "gives up.")
    no_replica_grace_s: float = Field(_ROUTER_DEFAULTS["no_replica_grace_s"], ge=0,
                                      description="Requests of a model with no live decode "
                                      "replica wait this long (a replica restarting) before they "
                                      "are refused with HTTP 503.")
    no_router_grace_s: float = Field(30.0, ge=0, description="Requests wait this long for a "
                                     "router while none is up (Ray restarts a lost one once it "
                                     "notices the loss of its node) before they are refused with "
                                     "HTTP 503 and Retry-After; never past a request's own "
                                     "deadline; 0: refused at once.")
    lease_ttl_s: float = Field(_ROUTER_DEFAULTS["lease_ttl_s"], gt=0,
                               description="An ingress silent this long is taken for dead: "
                               "its admission slots are freed. Keep it well above "
                               "stats_period_s (ingresses renew every period).")
    expected_output_tokens: int = Field(_ROUTER_DEFAULTS["expected_output_tokens"], ge=0,
                                        description="Output tokens a request is expected to "
                                        "produce, for its KV room, until the model's own output "
                                        "lengths are learned; 0: hold room for max_tokens.")
    output_tokens_quantile: float = Field(_ROUTER_DEFAULTS["output_tokens_quantile"], gt=0, le=1,
                                          description="Quantile of the model's recent output "
                                          "lengths held as KV room (preemption covers longer "
                                          "outputs).")
    adapter_miss_weight: float = Field(_ROUTER_DEFAULTS["adapter_miss_weight"], ge=0,
                                       description="Decode load (0..1) a replica is charged for "
                                       "not holding a request's LoRA adapter in a device slot "
                                       "(half when it is in its host memory): above it, a "
                                       "less loaded replica without the adapter wins.")
    adapter_load_s: float = Field(_ROUTER_DEFAULTS["adapter_load_s"], ge=0,
                                  description="Seconds added to a prefill replica's predicted "
                                  "TTFT when it does not hold a request's LoRA adapter in a "
                                  "device slot (half when it is in its host memory).")

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "RouterSpec":
        if self.lease_ttl_s < 4 * self.stats_period_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must be at least 4x "
                             f"stats_period_s ({self.stats_period_s}): ingresses renew their "
                             "slots once a period")
        return self

    def router_config(self, models: Mapping[str, ModelFacts]) -> RouterConfig:
        """The router's config for serving ``models`` (name -> its facts)."""
        return RouterConfig(models=dict(models),
                            **self.model_dump(exclude=set(self.NOT_ROUTER_FIELDS)))
