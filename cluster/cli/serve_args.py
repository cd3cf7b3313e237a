"""``splitserve serve [MODEL] [flags]``: the command line vLLM users know,
turned into an operator config.

The config starts from ``--config FILE`` (or the built-in defaults: the
embedded model, one prefill and one decode replica) and each flag given
overrides one key of it, so a command line graduates into a file:
``splitserve serve MODEL ... --print-config > cluster.yaml`` prints the
operator YAML that ``splitserve deploy cluster.yaml`` and
``splitserve serve --config cluster.yaml`` apply unchanged.

Model flags (``--max-model-len``, ``--dtype``, ...) apply to the one served
model: with a config of several models, they are refused (edit the file).
``--prefill-replicas N`` / ``--decode-replicas N`` fix a pool at N replicas
(no autoscaling); bounds and targets belong in the file.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from splitserve.cluster.config import ClusterConfig, ConfigError, load_config, parse_config
from splitserve.cluster.config.models import MAX_REPLICAS

# vLLM's spellings of the dtypes we support
_DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}
_KV_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8"}

# flag dest -> ModelSpec key
_MODEL_FLAGS = {"served_model_name": "name", "revision": "revision",
                "max_model_len": "max_model_len", "dtype": "dtype",
                "kv_cache_dtype": "kv_cache_dtype", "max_num_seqs": "max_num_seqs",
                "max_num_batched_tokens": "max_num_batched_tokens", "block_size": "block_size",
                "device": "device", "chat_template": "chat_template",
                "tool_call_parser": "tool_call_parser", "reasoning_parser": "reasoning_parser",
                "enable_prefix_caching": "enable_prefix_caching",
                "tensor_parallel_size": "tensor_parallel_size"}


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitserve serve`` that shape the cluster's config."""
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or Hugging Face repo id (org/name) to serve; "
                        "default: the config's model (or the embedded default model)")
    p.add_argument("--config", default=None, help="operator YAML (see deploy/configs/); flags "
                                                   "override its keys")
    p.add_argument("--print-config", action="store_true",
                   help="print the operator YAML these arguments describe, and exit")
    api = p.add_argument_group("API")
    api.add_argument("--host", default=None, help="bind address of the APIs (default: config's)")
    api.add_argument("--port", "--http-port", dest="http_port", type=int, default=None,
                     help="OpenAI HTTP API port")
    api.add_argument("--grpc-port", type=int, default=None, help="gRPC API port")
    api.add_argument("--http-server", choices=["proxy", "ingress"], default=None,
                     help="who serves the HTTP API: Ray Serve's proxy, or the ingress "
                          "replicas themselves (no proxy hop); default: the config's")
    api.add_argument("--api-key", action="append", default=None,
                     help="client key required on every request (repeat for several)")
    model = p.add_argument_group("model and engine")
    model.add_argument("--served-model-name", default=None,
                       help="name clients ask for (default: MODEL as given)")
    model.add_argument("--revision", default=None, help="branch, tag or commit of a repo id")
    model.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    model.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                       help="compute dtype (default: the config's, auto: the checkpoint's)")
    model.add_argument("--kv-cache-dtype", choices=sorted(_KV_DTYPES), default=None,
                       help="KV cache dtype (default: the config's, auto: --dtype)")
    model.add_argument("--quantization", "-q", choices=["fp8"], default=None,
                       help="fp8: quantize the weights to fp8 at load (fp8 checkpoints "
                            "load as fp8 without it)")
    model.add_argument("--max-num-seqs", type=int, default=None,
                       help="sequences one replica runs at once")
    model.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one engine step")
    model.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    model.add_argument("--device", default=None, help="auto | cpu | cuda")
    model.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                       help="ranks (devices) each replica splits the model over, in both "
                            "pools; a pool can set its own in the config file")
    model.add_argument("--chat-template", default=None,
                       help="chat template: a Jinja file or the template text")
    model.add_argument("--tool-call-parser", default=None,
                       choices=["auto", "hermes", "mistral", "llama3_json"],
                       help="how tool calls are read from the model's output (default: the "
                            "config's, auto: from the chat template)")
    model.add_argument("--reasoning-parser", default=None,
                       choices=["none", "auto", "qwen3", "deepseek_r1"],
                       help="how the model's thinking is split into reasoning_content")
    model.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=None, help="reuse the KV of shared prompt prefixes (default: on)")
    pools = p.add_argument_group("splitserve")
    pools.add_argument("--mode", choices=["disaggregated", "colocated"], default=None,
                       help="separate prefill and decode pools, or one pool doing both")
    pools.add_argument("--prefill-replicas", type=int, default=None,
                       help="fixed number of prefill replicas (no autoscaling)")
    pools.add_argument("--decode-replicas", type=int, default=None,
                       help="fixed number of decode (or colocated) replicas (no autoscaling)")
    pools.add_argument("--transport", choices=["grpc", "torch_dist"], default=None,
                       help="KV hand-off transport")


def _fixed_pool(pool: dict[str, Any], n: int, flag: str) -> dict[str, Any]:
    if not 1 <= n <= MAX_REPLICAS:
        raise ConfigError(f"{flag} must be from 1 to {MAX_REPLICAS}, got {n}")
    return {**pool, "min_replicas": n, "max_replicas": n, "initial_replicas": None,
            "autoscaling": None}


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The cluster config that ``--config`` plus the flags describe; raises
    ``ConfigError`` naming the flag or key at fault."""
    base = load_config(args.config) if args.config else ClusterConfig()
    if args.tensor_parallel_size is not None and args.tensor_parallel_size < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got "
                          f"{args.tensor_parallel_size}")
    data = base.model_dump(mode="json")
    model_updates = {}
    if args.model is not None:
        model_updates["path"] = args.model
        model_updates["name"] = args.model  # as vLLM: clients ask for the model as given
    for dest, key in _MODEL_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            model_updates[key] = value
    if "dtype" in model_updates:
        model_updates["dtype"] = _DTYPES[model_updates["dtype"]]
    if args.quantization is not None:
        model_updates["weight_dtype"] = args.quantization
    if "kv_cache_dtype" in model_updates:
        model_updates["kv_cache_dtype"] = _KV_DTYPES[model_updates["kv_cache_dtype"]]
    served_updates: dict[str, Any] = {}
    if args.mode is not None:
        served_updates["mode"] = args.mode
    if (model_updates or served_updates or args.prefill_replicas or args.decode_replicas) \
            and len(data["models"]) != 1:
        raise ConfigError(f"the config serves {len(data['models'])} models: a MODEL argument and "
                          "model or pool flags apply to a config with exactly one; edit the file")
    served = data["models"][0]
    served["model"].update(model_updates)
    served.update(served_updates)
    if args.prefill_replicas is not None:
        if served["mode"] == "colocated":  # the pool the flag sizes is not deployed
            raise ConfigError("--prefill-replicas: a colocated model has no prefill pool (one "
                              "pool does both: size it with --decode-replicas)")
        served["prefill"] = _fixed_pool(served["prefill"], args.prefill_replicas,
                                        "--prefill-replicas")
    if args.decode_replicas is not None:
        served["decode"] = _fixed_pool(served["decode"], args.decode_replicas,
                                       "--decode-replicas")
    for key, value in (("host", args.host), ("http_port", args.http_port),
                       ("grpc_port", args.grpc_port), ("http_server", args.http_server)):
        if value is not None:
            data["endpoints"][key] = value
    if args.api_key is not None:
        data["auth"]["api_keys"] = list(args.api_key)
    if args.transport is not None:
        data["transfer"]["transport"] = args.transport
    try:
        return parse_config(data, "command line")
    except ConfigError as e:
        raise ConfigError(_name_flags(str(e), args)) from None


def _name_flags(message: str, args: argparse.Namespace) -> str:
    """``command line: endpoints.http_port: ...`` -> ``command line: --port
    (endpoints.http_port): ...`` for each key a flag given set."""
    flags = [("endpoints.http_port", "--port", "http_port"),
             ("endpoints.grpc_port", "--grpc-port", "grpc_port"),
             ("endpoints.host", "--host", "host"), ("models.0.model.path", "MODEL", "model"),
             ("endpoints.http_server", "--http-server", "http_server"),
             ("models.0.model.weight_dtype", "--quantization", "quantization")]
    flags += [(f"models.0.model.{key}", "--" + dest.replace("_", "-"), dest)
              for dest, key in _MODEL_FLAGS.items()]
    for loc, flag, dest in flags:
        if getattr(args, dest, None) is not None:
            message = message.replace(f" {loc}:", f" {flag} ({loc}):")
    return message


def config_yaml(cfg: ClusterConfig) -> str:
    """``cfg`` as an operator YAML file, every key spelled out (defaults
    included), which ``splitserve deploy`` applies unchanged."""
    data = cfg.model_dump(mode="json")
    header = "# splitserve operator config: splitserve deploy FILE, or splitserve serve --config FILE\n"
    if data["auth"]["api_keys"] or data["auth"]["cluster_token"]:
        header += "# holds secrets given on the command line or in the source config: keep it private\n"
    return header + yaml.safe_dump(data, sort_keys=False)
