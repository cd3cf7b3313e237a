"""The operator's cluster description (one YAML file), validated.

Every user-facing knob lives here with its description; an invalid file is
refused with the key path and the problem, and nothing is applied. One
module per part of the file: ``models`` (served models, engines, pools,
autoscaling), ``adapters`` (LoRA adapters on a model), ``router`` (placement and deadlines), ``transfer`` (KV
hand-off and its TLS), ``access`` (auth, endpoints, probes), ``cluster``
(the whole file: parse, load, diff) and ``reference`` (the docs table).
"""

from .access import AuthSpec, EndpointSpec, ObservabilitySpec
from .adapters import AdapterSpec
from .base import ConfigError, is_loopback_host
from .cluster import ClusterConfig, SLOSpec, config_changes, load_config, parse_config
from .models import AutoscalingSpec, ModelSpec, PoolSpec, ServedModel
from .reference import config_reference
from .router import DeadlineSpec, RouterSpec
from .transfer import TLSSpec, TransferSpec

__all__ = [
    "AdapterSpec", "AuthSpec", "AutoscalingSpec", "ClusterConfig", "ConfigError", "DeadlineSpec",
    "EndpointSpec", "ModelSpec", "ObservabilitySpec", "PoolSpec", "RouterSpec", "SLOSpec",
    "ServedModel", "TLSSpec", "TransferSpec", "config_changes", "config_reference",
    "is_loopback_host", "load_config", "parse_config",
]
