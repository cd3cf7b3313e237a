"""The Markdown reference of every operator config key (docs/operators.md)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from .access import AuthSpec, EndpointSpec, ObservabilitySpec
from .adapters import AdapterSpec
from .cluster import ClusterConfig, SLOSpec
from .models import AutoscalingSpec, ModelSpec, PoolEngineSpec, PoolSpec, ServedModel
from .router import DeadlineSpec, RouterSpec
from .routes import LatencyGuardSpec, RampSpec, RouteSpec, VariantSpec
from .speculative import SpeculativeSpec
from .tracing import TracingSpec
from .transfer import TLSSpec, TransferSpec


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    text = re.sub(r"splitserve\.cluster\.config\.(?:\w+\.)*(\w+)", r"\1", text)
    return text.replace("NoneType", "None").replace("|", "or").replace("Literal", "one of ")


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return f"{len(value)} entry with its defaults"
        return "(its defaults)" if isinstance(value, BaseModel) else repr(value)
    return repr(field.default)


def config_reference() -> str:
    """The Markdown reference of every operator config key, from the Field
    descriptions (docs/operators.md embeds it; a test keeps them in sync)."""
    sections = [("(top level)", ClusterConfig), ("models[]", ServedModel),
                ("models[].model", ModelSpec), ("models[].model.adapters[]", AdapterSpec),
                ("models[].model.speculative", SpeculativeSpec),
                ("models[].prefill / models[].decode", PoolSpec),
                ("models[].prefill.autoscaling / models[].decode.autoscaling", AutoscalingSpec),
                ("models[].prefill.engine / models[].decode.engine", PoolEngineSpec), ("router", RouterSpec),
                ("routes[]", RouteSpec), ("routes[].variants[]", VariantSpec),
                ("routes[].ramp", RampSpec),
                ("routes[].ramp.ttft / routes[].ramp.tpot", LatencyGuardSpec),
                ("transfer", TransferSpec), ("transfer.tls", TLSSpec), ("deadlines", DeadlineSpec),
                ("auth", AuthSpec), ("endpoints", EndpointSpec), ("slo", SLOSpec),
                ("observability", ObservabilitySpec), ("observability.tracing", TracingSpec)]
    out = []
    for title, model in sections:
        out += [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            ty = _type_name(f.annotation).replace("|", "\\|")
            out.append(f"| `{name}` | {ty} | `{_default_text(f)}` | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
