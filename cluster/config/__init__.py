"""The operator's cluster description (one YAML file), validated.

Every user-facing knob lives here with its description; an invalid file is
refused with the key path, its line in the file and the problem, and
nothing is applied. One module per part of the file: ``models`` (served models, engines, pools,
autoscaling), ``adapters`` (LoRA adapters on a model), ``router`` (placement
and deadlines), ``routes`` (traffic splitting and canary ramps), ``transfer``
(KV hand-off and its TLS), ``speculative`` (a model's speculative decoding),
``access`` (auth, endpoints, probes), ``tracing``
(OpenTelemetry export), ``cluster``
(the whole file: parse, load, diff), ``lines`` (where a key path sits in
the file, for its errors) and ``reference`` (the docs table).
"""

from .access import AuthSpec, EndpointSpec, ObservabilitySpec
from .adapters import AdapterSpec
from .base import ConfigError, is_loopback_host
from .cluster import ClusterConfig, SLOSpec, config_changes, load_config, parse_config
from .models import AutoscalingSpec, ModelSpec, PoolEngineSpec, PoolSpec, ServedModel
from .reference import config_reference
from .router import DeadlineSpec, RouterSpec
from .routes import LatencyGuardSpec, RampSpec, RouteSpec, VariantSpec
from .speculative import SpeculativeSpec
from .tracing import TracingSpec
from .transfer import TLSSpec, TransferSpec

__all__ = [
    "AdapterSpec", "AuthSpec", "AutoscalingSpec", "ClusterConfig", "ConfigError", "DeadlineSpec",
    "EndpointSpec", "LatencyGuardSpec", "ModelSpec", "ObservabilitySpec", "PoolEngineSpec",
    "PoolSpec", "RampSpec", "RouteSpec", "RouterSpec", "SLOSpec", "ServedModel", "SpeculativeSpec",
    "TLSSpec",
    "TracingSpec", "TransferSpec", "VariantSpec", "config_changes", "config_reference",
    "is_loopback_host", "load_config", "parse_config",
]
