"""The whole operator file: ``ClusterConfig``, how it is parsed and loaded,
and what applying one over another changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .access import AuthSpec, EndpointSpec, ObservabilitySpec
from .base import ConfigError, _Strict, closest_key
from .lines import locate, read_yaml
from .models import ServedModel
from .router import DeadlineSpec, RouterSpec
from .routes import RouteSpec, check_routes
from .transfer import TransferSpec


class SLOSpec(_Strict):
    ttft_s: float = Field(1.0, gt=0, description="Time-to-first-token objective (reports and "
                          "benchmarks).")
    tpot_s: float = Field(0.2, gt=0, description="Time-per-output-token objective.")


class ClusterConfig(_Strict):
    name: str = Field("splitserve", description="Cluster name, shown by `splitserve status`.")
    models: list[ServedModel] = Field(default_factory=lambda: [ServedModel()], min_length=1,
                                      description="The models served, each with its pools.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="Request placement.")
    routes: list[RouteSpec] = Field(default_factory=list, description="Model names that split "
                                    "their traffic over weighted variants (served models), "
                                    "with optional canary ramps; edits apply in place.")
    transfer: TransferSpec = Field(default_factory=TransferSpec, description="KV hand-off.")
    deadlines: DeadlineSpec = Field(default_factory=DeadlineSpec, description="Deadlines of "
                                    "the streams between ingress and decode replicas.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="Client and worker secrets.")
    endpoints: EndpointSpec = Field(default_factory=EndpointSpec, description="Client APIs.")
    slo: SLOSpec = Field(default_factory=SLOSpec, description="Latency objectives.")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec,
                                             description="Metrics and probe endpoints.")

    @model_validator(mode="after")
    def _unique_names(self) -> "ClusterConfig":
        names = [m.model.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        check_routes(self.routes, self.models)
        return self

    def exposure_problem(self) -> str | None:
        """Why serving this config would open a door (a non-loopback API
        without client keys, not explicitly allowed), or None."""
        ep = self.endpoints
        if ep.is_loopback() or self.auth.has_api_keys() or ep.allow_unauthenticated:
            return None
        return (f"endpoints.host {ep.host!r} is reachable from other machines but no API key is "
                "configured: set auth.api_keys, auth.api_keys_file or auth.api_keys_env, or "
                "endpoints.allow_unauthenticated: true to serve without client auth")

    def cluster_token(self) -> str | None:
        """The operator's cluster token (config, file or environment), or None
        when the cluster keeps its own random one (cluster/serve/secrets.py)."""
        a = self.auth
        if a.cluster_token:
            return a.cluster_token
        if a.cluster_token_file:
            try:
                token = Path(a.cluster_token_file).expanduser().read_text().strip()
            except OSError as e:
                raise ConfigError(f"auth.cluster_token_file {a.cluster_token_file}: "
                                  f"{e.strerror}") from None
            if not token:
                raise ConfigError(f"auth.cluster_token_file {a.cluster_token_file}: empty")
            return token
        return os.environ.get("SPLITSERVE_CLUSTER_TOKEN") or None


def _format(e: ValidationError, node: yaml.Node | None = None) -> str:
    """One clause per error: the key path, where the file has it (when read
    from one: ``node``), the problem and a typo hint."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        where = locate(node, err["loc"]) if node is not None else None
        if where:
            loc += f" ({where})"
        hint = _did_you_mean(err["loc"]) if err["type"] == "extra_forbidden" else None
        lines.append(f"{loc}: {err['msg']}" + (f" (did you mean {hint!r}?)" if hint else ""))
    return "; ".join(lines)


def _did_you_mean(loc: tuple) -> str | None:
    """The key of the section at ``loc[:-1]`` closest to the unknown key
    ``loc[-1]`` (a typo: ``max_replica``), or None."""
    import types
    import typing

    from pydantic import BaseModel

    def model_in(ann):  # the section class inside list[X], X | None, dict[str, X]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        if typing.get_origin(ann) in (list, dict, typing.Union, types.UnionType):
            for arg in typing.get_args(ann):
                found = model_in(arg)
                if found is not None:
                    return found
        return None

    cls: type[BaseModel] | None = ClusterConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list's index: the list's items are the class found for it
        field = cls.model_fields.get(part) if cls else None
        cls = model_in(field.annotation) if field else None
        if cls is None:
            return None
    return closest_key(loc[-1], cls.model_fields)


def parse_config(data: Any, source: str = "config", *,
                 node: yaml.Node | None = None) -> ClusterConfig:
    """``data`` validated; ConfigError naming ``source`` and each key at
    fault, with its line when ``node`` is the YAML tree ``data`` came from
    (``load_config``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format(e, node)}") from None
    problem = cfg.exposure_problem()
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    return cfg


MAX_FILE_BYTES = 1_000_000


def load_config(path: str | Path) -> ClusterConfig:
    """The operator file at ``path``, validated; ConfigError naming the file
    and the line (YAML syntax) or the key and its line (content) at fault.
    An empty file is refused (a failed redirect writes one): ``{}`` asks for
    every default."""
    p = Path(path)
    try:
        size = p.stat().st_size if p.is_file() else 0
        if size > MAX_FILE_BYTES:  # PyYAML reads about 250 KB a second: a 10 MB file is a minute
            raise ConfigError(f"{p}: {size / 1e6:.1f} MB; an operator config is at most "
                              f"{MAX_FILE_BYTES / 1e6:.0f} MB (many API keys belong in "
                              "auth.api_keys_file)")
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: not UTF-8 text (byte {e.object[e.start]:#04x}); "
                          "an operator config is a YAML file") from None
    try:
        data, node = read_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {_yaml_problem(e)}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty (no YAML content); write '{{}}' for a cluster "
                          "of all the defaults")
    return parse_config(data, str(p), node=node)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where (1-based line and column) and what the parser found."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{context}: " if context else "") + problem


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(
            isinstance(v, dict) and "model" in v for v in value):
        for v in value:  # served models are keyed by name, not position
            _flatten(v, f"{prefix}[{v['model']['name']}]", out)
    elif isinstance(value, list) and value and all(
            isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
        for v in value:  # routes and their variants too
            _flatten({k: x for k, x in v.items() if k != "name"}, f"{prefix}[{v['name']}]", out)
    else:
        out[prefix] = value


def config_changes(old: ClusterConfig | None, new: ClusterConfig) -> list[str]:
    """What applying ``new`` over ``old`` changes, one line per key, e.g.
    ``models[tiny].decode.max_replicas: 2 -> 4``; one line per served
    model or route added or removed whole (``models[b]: added``), and per
    named entry or section added or removed within one
    (``models[a].model.adapters[sql]: added (path '/adapters/sql')``,
    ``models[a].model.speculative: removed``); secrets are not shown."""
    if old is None:
        return ["(new cluster)"]
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old.model_dump(), "", a)
    _flatten(new.model_dump(), "", b)
    entries_a, entries_b = _entries(old), _entries(new)
    whole = {e: "added" for e in entries_b - entries_a} | {e: "removed" for e in entries_a - entries_b}
    lines = {e: f"{e}: {what}" for e, what in whole.items()}
    added = _grouped(b, a, whole)
    removed = _grouped(a, b, whole)
    for root, items in added.items():
        shown = ", ".join(f"{k} {v!r}" for k, v in _not_default(new, root, items).items())
        lines[root] = f"{root}: added" + (f" ({shown})" if shown else "")
    lines.update({root: f"{root}: removed" for root in removed})
    grouped = added.keys() | removed.keys()
    for key in a.keys() | b.keys():
        if key.split(".", 1)[0] in whole or a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key in grouped or any(key.startswith(r) and key[len(r)] in ".[" for r in grouped
                                 if len(key) > len(r)):
            continue  # under an entry or section of its own line
        if a.get(key, b.get(key)) in (None, [], {}) and any(
                r.startswith(key) and r[len(key)] in ".[" for r in grouped if len(r) > len(key)):
            continue  # the empty value an entry or section replaced (or was replaced by)
        if key.startswith("auth."):
            lines[key] = f"{key}: changed"
        elif key not in a:
            lines[key] = f"{key}: added {b[key]!r}"
        elif key not in b:
            lines[key] = f"{key}: removed"
        else:
            lines[key] = f"{key}: {a[key]!r} -> {b[key]!r}"
    return [lines[k] for k in sorted(lines)]


def _grouped(this: dict[str, Any], other: dict[str, Any],
             whole: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The keys of ``this`` that ``other`` lacks, grouped under the entry or
    section that ``other`` lacks whole: a named entry (``adapters[sql]``) it
    has not, or a section it holds as an empty value (``speculative: None``,
    ``adapters: []``). {root: {key below root: value}}, in ``this``'s order."""
    roots_other = {key[:i + 1] for key in other for i, c in enumerate(key) if c == "]"}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in this.items():
        if key in other or key.startswith("auth.") or key.split(".", 1)[0] in whole:
            continue  # a model or route added whole has its line; secrets have theirs
        cuts = [i for i, c in enumerate(key) if c in ".[" or (c == "]" and i + 1 < len(key))]
        root = None
        for i in cuts:
            prefix = key[:i + 1] if key[i] == "]" else key[:i]
            if key[i] == "]" and prefix not in roots_other:
                root = prefix  # an entry other has not
                break
            if key[i] == "." and other.get(prefix, "<unset>") in (None, [], {}):
                root = prefix  # a section other holds empty (an empty list's
                break          # entries are found at their "]")
        if root is None:
            continue
        sub = key[len(root):].lstrip(".")
        groups.setdefault(root, {})[sub] = value
    return groups


def _not_default(cfg: ClusterConfig, root: str, items: dict[str, Any]) -> dict[str, Any]:
    """``items`` (keys below ``root`` in ``cfg``) less the fields left at
    their defaults, so an added section shows what its file sets."""
    import re

    obj: Any = cfg
    for name, entry in re.findall(r"([A-Za-z_]\w*)(?:\[([^\]]*)\])?", root):
        obj = getattr(obj, name, None)
        if entry and isinstance(obj, list):
            obj = next((v for v in obj if entry in (getattr(v, "name", None),
                                                    getattr(getattr(v, "model", None), "name", None))), None)
    fields = getattr(type(obj), "model_fields", {})
    out = {}
    for key, value in items.items():
        f = fields.get(key)
        if value in (None, [], {}) or (f is not None and not f.is_required()
                                       and f.get_default(call_default_factory=True) == value):
            continue
        out[key] = value
    return out


def _entries(cfg: ClusterConfig) -> set[str]:
    """The served models and routes by the key prefix ``_flatten`` gives them."""
    return ({f"models[{s.model.name}]" for s in cfg.models}
            | {f"routes[{r.name}]" for r in cfg.routes})
