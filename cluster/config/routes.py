"""The ``routes`` section: model names that split their traffic over
weighted variants (other served models, or adapters served under their own
names), sticky per client, with an optional canary ramp and its guards.

A route resolves to a variant's name only; that name then goes through the
ingress's ordinary model lookup, so anything servable under a name can be a
variant. ``splitserve deploy`` applies an edited routes section to the
running cluster without restarting any replica
(``splitserve.cluster.serve.route_actor``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from splitserve.router.route_messages import LatencyGuard, RampPolicy, RoutePolicy

from .base import _Strict

DEFAULT_KEY_HEADER = "x-splitserve-user"


class VariantSpec(_Strict):
    name: str = Field(..., min_length=1, description="A served model's name (or an adapter's, "
                      "where models declare adapters) that serves this share of the route.")
    weight: float = Field(..., ge=0, description="Relative share of the route's traffic; 0 "
                          "sends it none. Weights need not add up to 100.")


class LatencyGuardSpec(_Strict):
    percentile: Literal["p50", "p90", "p99"] = Field("p90", description="Which percentile of "
                                                     "the new variant is compared.")
    max_ratio: float = Field(..., gt=0, description="The new variant's percentile may be at "
                             "most this many times the baseline's (e.g. 1.2: 20% slower).")

    def guard(self) -> LatencyGuard:
        return LatencyGuard(self.percentile, self.max_ratio)


class RampSpec(_Strict):
    """A canary ramp: the new ``variant`` takes ``steps`` percent of the
    route in turn; the other variants (the baseline) share the rest in the
    proportions of their weights."""

    variant: str = Field(..., description="The new variant (one of the route's variants).")
    steps: list[float] = Field(..., min_length=1, description="Its share of the route at each "
                               "step, percent, increasing (e.g. [1, 10, 20, 50, 100]); reaching "
                               "the last step completes the ramp.")
    hold_s: float = Field(300.0, ge=0, description="Least time a step is held before the next.")
    min_requests: int = Field(100, ge=1, description="Requests the new variant (and, for the "
                              "guards relative to the baseline, the baseline) must have "
                              "finished in a step before the guards are judged.")
    max_error_rate: float | None = Field(0.05, ge=0, le=1, description="Highest share of the "
                                         "new variant's requests that may fail (server errors: "
                                         "5xx, deadlines); None: no absolute bound.")
    max_error_rate_ratio: float | None = Field(None, gt=0, description="The new variant's "
                                               "error rate may be at most this many times the "
                                               "baseline's (at least error_rate_floor's); None: "
                                               "no relative bound.")
    error_rate_floor: float = Field(0.01, ge=0, le=1, description="The baseline error rate "
                                    "assumed when it is lower, so that a few errors against a "
                                    "clean baseline do not break max_error_rate_ratio.")
    ttft: LatencyGuardSpec | None = Field(None, description="Bound on the new variant's TTFT "
                                          "percentile relative to the baseline's.")
    tpot: LatencyGuardSpec | None = Field(None, description="Bound on the new variant's TPOT "
                                          "percentile relative to the baseline's.")
    rollback: Literal["previous", "zero"] = Field(
        "previous", description="Where a broken guard sends the ramp: the previous step "
        "(0% from the first) or straight to 0%. Either way the ramp stops there until the "
        "route is applied again changed.")

    @model_validator(mode="after")
    def _increasing(self) -> "RampSpec":
        s = self.steps
        if any(not 0 < x <= 100 for x in s):
            raise ValueError(f"ramp steps must be percents in (0, 100], got {s}")
        if any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"ramp steps must increase, got {s}")
        return self

    def policy(self) -> RampPolicy:
        return RampPolicy(
            variant=self.variant, steps=tuple(float(x) for x in self.steps), hold_s=self.hold_s,
            min_requests=self.min_requests, max_error_rate=self.max_error_rate,
            max_error_rate_ratio=self.max_error_rate_ratio,
            error_rate_floor=self.error_rate_floor,
            ttft=self.ttft.guard() if self.ttft else None,
            tpot=self.tpot.guard() if self.tpot else None, rollback=self.rollback)


class RouteSpec(_Strict):
    name: str = Field(..., min_length=1, description="The model name clients ask for; it must "
                      "not be a served model's name. Responses echo it in `model` and name "
                      "the variant in the x-splitserve-variant header.")
    variants: list[VariantSpec] = Field(..., min_length=1, description="The served models "
                                        "(or adapters) the route's traffic is split over.")
    key_header: str | None = Field(DEFAULT_KEY_HEADER, description="HTTP header (gRPC metadata "
                                   "key) carrying the client key that keeps a client on one "
                                   "variant; without it the OpenAI `user` field is the key; "
                                   "None: only `user`.")
    sticky: bool = Field(True, description="Keep each client key on one variant while the "
                         "weights stay the same (consistent hashing: a weight change moves the "
                         "fewest keys); false, or no key sent: weighted random per request.")
    ramp: RampSpec | None = Field(None, description="A canary ramp of one variant; while it "
                                  "runs it sets the weights (the others' weights only share "
                                  "the rest).")

    @field_validator("key_header")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("key_header must name a header (or be null)")
        return None if v is None else v.strip().lower()  # as HTTP and gRPC carry header names

    @model_validator(mode="after")
    def _variants(self) -> "RouteSpec":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"route {self.name!r}: variants repeated: {dup}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"route {self.name!r}: the variants' weights must add up to more "
                             "than 0")
        r = self.ramp
        if r is not None:
            if r.variant not in names:
                raise ValueError(f"route {self.name!r}: ramp.variant {r.variant!r} is not one "
                                 f"of its variants {names}")
            if sum(v.weight for v in self.variants if v.name != r.variant) <= 0:
                raise ValueError(f"route {self.name!r}: a ramp needs a baseline: another "
                                 "variant with a weight above 0")
        return self

    def policy(self) -> RoutePolicy:
        """The route as the route controller takes it."""
        return RoutePolicy(
            name=self.name, variants=tuple(v.name for v in self.variants),
            weights=tuple(float(v.weight) for v in self.variants), key_header=self.key_header,
            sticky=self.sticky, ramp=self.ramp.policy() if self.ramp else None)


def servable_names(models: list[Any]) -> set[str]:
    """Names a route may use as variants: every served model's, and every
    LoRA adapter's its model declares (``ModelSpec.adapters``: entries named
    by a ``name`` attribute or plain strings)."""
    names = set()
    for m in models:
        names.add(m.model.name)
        for a in getattr(m.model, "adapters", None) or getattr(m, "adapters", None) or ():
            names.add(a if isinstance(a, str) else getattr(a, "name", None))
    names.discard(None)
    return names


def check_routes(routes: list[RouteSpec], models: list[Any]) -> None:
    """Cross-section checks: unique route names that are no servable name,
    variants that are servable names. Raises ValueError naming the route."""
    servable = servable_names(models)
    seen = set()
    for r in routes:
        if r.name in seen:
            raise ValueError(f"route names must be unique; repeated: {r.name!r}")
        seen.add(r.name)
        if r.name in servable:
            raise ValueError(f"route {r.name!r} has the name of a served model or adapter")
        missing = [v.name for v in r.variants if v.name not in servable]
        if missing:
            raise ValueError(f"route {r.name!r}: variants {missing} are not served; served "
                             f"names: {sorted(servable)}")
