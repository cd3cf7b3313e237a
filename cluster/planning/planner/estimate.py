"""The planner's analytic estimator: every combination of the space scored
with numpy, from the same step-time model the simulator runs.

A pool's replicas are modelled in steady state at the workload's peak rate:

- **step period** (decode, and colocated): each step carries the running
  sequences' decode tokens and the prompt tokens that arrived during the
  previous step, so its length tau solves tau = overhead + max_f (c_f +
  beta_f tau), i.e. tau = max_f (overhead + c_f) / (1 - beta_f), where
  beta_f is the form's work per second of arrivals (a form of the
  step-time model: compute or memory roofline, or the fitted line). Little's
  law gives the running sequences n = rate x output tokens x tau; TPOT at a
  percentile takes n + z sqrt(n) sequences.
- **prefill** (disaggregated prefill pools, and the prompt share of
  colocated replicas): a token server at the rate of a full-budget step,
  queued as M/G/c (Erlang C with the prompts' squared coefficient of
  variation; c = 1 per replica under round robin), its waiting time's tail
  exponential; a prompt's own time is its chunks through the step model.
- **slots**: a decode replica admits a request only with a free batch slot
  and blocks for prompt + output (the router's rule, else the request
  fails); the pool is a loss system of replicas x slots, blocking by the
  normal approximation of Erlang B.
- **memory**: weights, activations of a full-budget step, and the KV cache
  in the rest of 90% of device memory; a prompt and its output must fit.

Bounds (necessary conditions: a combination failing one cannot meet the
SLOs under this model) are applied before the estimate: memory fit, the
step model's latency floors (a prompt alone, a batch of one), stability
(utilization < 1) and the offers' device counts, the budget and the quality
floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from splitserve.cluster.config import ModelSpec
from splitserve.cluster.planning import profiles
from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.hardware import Hardware, local_cpu_key
from splitserve.cluster.planning.planner.candidates import col
from splitserve.cluster.planning.planner.inputs import (
    SLO, Offer, PlanInputError, WorkloadModel, z_of)
from splitserve.cluster.planning.planner.space import (
    EngineGrid, RouterOption, SpaceSpec, fp8_index, tp_splits)
from splitserve.cluster.planning.shapes import ModelShape

MEMORY_UTILIZATION = 0.9  # share of device memory the engine may use
CPU_KV_BYTES = 1 << 30  # KV cache per CPU replica (host memory is shared by every replica)
RPC_S = 0.0005  # one hop, as the simulator's default
DEVICES_PER_NODE = 8
INF = float("inf")


@dataclass(frozen=True)
class Device:
    index: int
    key: str  # profile database key
    sim_key: str  # what the simulator is told ("local" for this CPU)
    hw: Hardware
    price: float  # per device-hour
    count: int
    cpu: bool
    threads: int = 1  # CPU threads of one replica

    @property
    def label(self) -> str:
        return "local CPU" if self.sim_key == "local" else self.key


def resolve_devices(db: ProfileDB, offers: list[Offer]) -> list[Device]:
    out = []
    for i, off in enumerate(offers):
        if off.key == "local":
            key, sim_key, cpu = local_cpu_key(1), "local", True
        else:
            key, sim_key, cpu = off.key, off.key, off.key.startswith("cpu:")
        try:
            hw = profiles.hardware(db, key)
        except profiles.UnknownHardwareError as e:
            hint = " (run `splitserve profile` on this machine first)" if off.key == "local" else ""
            raise PlanInputError(f"{e}{hint}") from None
        price = off.price if off.price is not None else hw.price_per_hour
        if price is None:
            price = 0.0
        out.append(Device(i, key, sim_key, hw, float(price), off.count, cpu))
    if len({d.key for d in out}) != len(out):
        raise PlanInputError("each hardware kind may be offered once")
    return out


def engine_settings_for(dev: Device, tp: int, wd: str, kv: str):
    """The speed-relevant settings of a replica, built as the simulator builds them."""
    from splitserve.cluster.planning.sim.simulator import engine_settings

    if dev.cpu:
        s = engine_settings(ModelSpec(dtype="auto", kv_cache_dtype=kv, device="cpu"), "cpu", 1)
    else:
        s = engine_settings(ModelSpec(dtype="bfloat16", kv_cache_dtype=kv), "cuda", tp)
    if wd == "fp8":
        s = replace(s, dtype="fp8")
    return s


@dataclass
class Forms:
    """Step-time forms of each unit as arrays: t = oh + max_f (c_f + wp_f P + wa_f A +
    wb_f B + wc_f C); two forms per unit (a one-form fit is repeated)."""

    c: np.ndarray  # (U, 2)
    wp: np.ndarray
    wa: np.ndarray
    wb: np.ndarray
    wc: np.ndarray
    oh: np.ndarray  # (U,)
    compute_form: np.ndarray  # (U, 2) bool: the form that grows with tokens (speculation)


def _norm_cdf(x):
    # Abramowitz-Stegun 7.1.26 on erf, |error| < 1.5e-7
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * y)


def _norm_pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def erlang_b(c, a):
    """Blocking of a loss system of ``c`` servers offered ``a`` erlangs (normal
    approximation, Jagerman): phi(b) / (sqrt(a) Phi(b)), b = (c - a) / sqrt(a)."""
    a = np.maximum(a, 1e-12)
    s = np.sqrt(a)
    with np.errstate(invalid="ignore", over="ignore"):
        b = np.nan_to_num((c - a) / s, nan=-40.0, posinf=40.0, neginf=-40.0)
    return np.clip(_norm_pdf(b) / (s * np.maximum(_norm_cdf(b), 1e-300)), 0.0, 1.0)


def erlang_c(c, a, cmax: int):
    """P(wait) of M/M/c offered ``a`` erlangs (a < c), exactly, for integer c <= cmax."""
    a = np.asarray(a, dtype=np.float64)
    c = np.broadcast_to(c, a.shape)
    b = np.ones_like(a)
    out = np.zeros_like(a)
    for k in range(1, cmax + 1):
        b = a * b / (k + a * b)
        hit = c == k
        if hit.any():
            bk = b[hit]
            ak = a[hit]
            out[hit] = k * bk / np.maximum(k - ak * (1 - bk), 1e-12)
    return np.clip(out, 0.0, 1.0)


@dataclass
class WorkloadStats:
    """Per router option (axis 0) and replica count of the pool that prefills
    (axis 1): the prompt work that stays on decode replicas (local) and goes to
    prefill replicas (remote), per request of the workload."""

    rate: float
    eo: float  # mean output tokens
    lbar: float  # mean attention length while decoding, weighted by decode time
    q_total: float  # a high quantile of prompt + output (what must fit in KV)
    o_low: float  # a low quantile of output tokens (the noisiest TPOTs)
    max_prompt: float
    loc_n: np.ndarray
    loc_tok: np.ndarray
    loc_attn: np.ndarray
    loc_up: np.ndarray
    loc_m2: np.ndarray
    rem_n: np.ndarray
    rem_tok: np.ndarray
    rem_attn: np.ndarray
    rem_m2: np.ndarray
    rem_up: np.ndarray
    rem_ip: np.ndarray  # prompt length (with cached part) at the percentile, remote requests
    rem_imean: np.ndarray


def workload_stats(wl: WorkloadModel, opts: list[RouterOption], rmax: int, pct: float,
                   all_local: bool) -> WorkloadStats:
    i = wl.inputs.astype(np.float64)
    o = wl.outputs.astype(np.float64)
    c = wl.cached.astype(np.float64)
    shape = (len(opts), rmax)
    names = ("loc_n", "loc_tok", "loc_attn", "loc_up", "loc_m2", "rem_n", "rem_tok", "rem_attn",
             "rem_m2", "rem_up", "rem_ip", "rem_imean")
    arr = {n: np.zeros(shape) for n in names}
    for k, opt in enumerate(opts):
        threshold = INF if all_local else opt.local_prefill_max_tokens
        for r in range(1, rmax + 1):
            if opt.global_cache and r > 1:
                for n in names:
                    arr[n][k, r - 1] = arr[n][k, 0]
                continue
            hf = 1.0 if opt.global_cache else 1.0 / r
            u = np.maximum(1.0, np.round(i - hf * c))
            loc = u <= threshold
            rem = ~loc
            arr["loc_n"][k, r - 1] = loc.mean()
            arr["loc_tok"][k, r - 1] = (u * loc).mean()
            arr["loc_attn"][k, r - 1] = (u * (u + 1) / 2 * loc).mean()
            arr["loc_up"][k, r - 1] = np.percentile(u[loc], pct) if loc.any() else 0.0
            arr["loc_m2"][k, r - 1] = (u * u * loc).mean()
            arr["rem_n"][k, r - 1] = rem.mean()
            arr["rem_tok"][k, r - 1] = (u * rem).mean()
            arr["rem_attn"][k, r - 1] = (u * (u + 1) / 2 * rem).mean()
            arr["rem_m2"][k, r - 1] = (u * u * rem).mean()
            arr["rem_up"][k, r - 1] = np.percentile(u[rem], pct) if rem.any() else 0.0
            arr["rem_ip"][k, r - 1] = np.percentile(i[rem], pct) if rem.any() else 0.0
            arr["rem_imean"][k, r - 1] = i[rem].mean() if rem.any() else 0.0
    eo = float(o.mean())
    lbar = float((o * (i + o / 2)).sum() / max(o.sum(), 1.0))
    return WorkloadStats(rate=wl.peak_rate, eo=eo, lbar=lbar,
                         q_total=float(np.percentile(i + o, 99.5)), max_prompt=float(i.max()),
                         o_low=float(max(2.0, np.percentile(o, 100 - pct))),
                         **arr)


@dataclass
class Units:
    """One row per (device, TP degree, engine settings) of one pool role."""

    dev: np.ndarray
    tp: np.ndarray
    e: np.ndarray  # engine grid row (prefill units: the first row of its prefill_key)
    forms: Forms
    kv_tokens: np.ndarray  # KV cache tokens per replica
    kv_gib: np.ndarray  # KV cache memory per rank (the pool's kv_cache_memory_gb)
    mem_ok: np.ndarray
    price: np.ndarray  # per replica-hour
    cap: np.ndarray  # most replicas the offer allows
    seqs: np.ndarray
    budget: np.ndarray
    block: np.ndarray
    g: np.ndarray  # tokens per sequence per step (speculation), 1 without
    draft: np.ndarray  # tokens verified per sequence per step (k + 1), 1 without
    deployable: np.ndarray
    quality: np.ndarray  # perplexity increase vs the reference (NaN: unknown)
    flops_ok: np.ndarray

    def __len__(self) -> int:
        return len(self.dev)


class FormCache:
    def __init__(self, db: ProfileDB, shape: ModelShape):
        self.db = db
        self.shape = shape
        self._cache: dict = {}

    def get(self, dev: Device, tp: int, wd: str, kv: str):
        key = (dev.index, tp, wd, kv)
        if key not in self._cache:
            settings = engine_settings_for(dev, tp, wd, kv)
            model = profiles.step_model(self.db, self.shape, dev.hw, settings)
            forms = list(model.forms)
            if len(forms) == 1:
                forms = forms * 2
            self._cache[key] = (np.array(forms[:2]), model.overhead_s, model.provenance,
                                model.describe(), settings)
        return self._cache[key]


def build_units(devices: list[Device], space: SpaceSpec, grid: EngineGrid, rows: np.ndarray,
                shape: ModelShape, forms: FormCache, quality: np.ndarray,
                tp_support: set[int]) -> Units:
    """Units over ``rows`` of the engine grid, for every device and TP degree."""
    combos = [(d, tp, e) for d in devices for tp in space.tensor_parallel for e in rows
              if not (d.cpu and tp > 1) and tp <= d.count]
    n = len(combos)
    dev = np.array([c[0].index for c in combos], dtype=np.int64)
    tp = np.array([c[1] for c in combos], dtype=np.int64)
    e = np.array([c[2] for c in combos], dtype=np.int64)
    fc = np.zeros((n, 2, 5))
    oh = np.zeros(n)
    comp = np.zeros((n, 2), dtype=bool)
    kv_tokens = np.zeros(n)
    kv_gib = np.zeros(n)
    mem_ok = np.zeros(n, dtype=bool)
    flops_ok = np.ones(n, dtype=bool)
    price = np.zeros(n)
    cap = np.zeros(n, dtype=np.int64)
    seqs = grid.seqs[e]
    budget = grid.budget[e]
    block = grid.block[e]
    spec = grid.spec[e]
    g = np.ones(n)
    draft = np.ones(n)
    for k, name in enumerate(space.speculative):
        if name == "off":
            continue
        steps = int(name.split(":")[1])
        a = space.spec_acceptance
        g[spec == k] = (1 - a ** (steps + 1)) / (1 - a)
        draft[spec == k] = steps + 1
    # per (device, tp, wd, kv): forms and memory
    for key in sorted({(c[0].index, c[1], int(grid.wd[c[2]]), int(grid.kv[c[2]])) for c in combos}):
        d = devices[key[0]]
        wd, kv = space.weight_dtypes[key[2]], space.kv_dtypes[key[3]]
        sel = (dev == key[0]) & (tp == key[1]) & (grid.wd[e] == key[2]) & (grid.kv[e] == key[3])
        if d.cpu and wd == "fp8":
            flops_ok[sel] = False  # the CPU engine has no fp8 weights
        f, overhead, _, _, settings = forms.get(d, key[1], wd, kv)
        fc[sel] = f
        oh[sel] = overhead
        # the form whose per-token weight on decode sequences is the compute one
        comp[sel, int(np.argmax(f[:, 1]))] = True
        kv_per_token = shape.kv_bytes_per_token(settings.kv_dtype)
        weights = shape.weight_bytes("fp8" if wd == "fp8" else settings.dtype)
        act = budget[sel] * (2 * shape.hidden_size + shape.intermediate_size) * 4.0 / key[1]
        if d.cpu:
            free = np.full(sel.sum(), float(CPU_KV_BYTES))
            fits = np.full(sel.sum(), weights < d.hw.memory_bytes * MEMORY_UTILIZATION)
        else:
            free = d.hw.memory_bytes * key[1] * MEMORY_UTILIZATION - weights - act
            fits = free > 0
        # each rank holds its share of the KV heads (all of one when the heads are
        # fewer than the ranks) in its share of the free memory, as sim.pools.kv_blocks
        rank_free = np.maximum(free, 0) / key[1]
        hk = shape.num_kv_heads
        per_block = (kv_per_token * max(1, hk // key[1]) // hk if hk else kv_per_token) * block[sel]
        blocks = np.floor(rank_free / per_block)
        kv_tokens[sel] = blocks * block[sel]
        kv_gib[sel] = rank_free / (1 << 30)
        mem_ok[sel] = fits & (blocks >= 16)
        price[sel] = d.price * key[1]
        cap[sel] = min(space.max_replicas, d.count // key[1])
    dep = grid.deployable[e] & np.isin(tp, [t for t in tp_support if tp_splits(shape, t)])
    dep &= (tp == 1) | (grid.wd[e] != fp8_index(space))  # fp8 weights are not split (yet)
    return Units(dev=dev, tp=tp, e=e,
                 forms=Forms(fc[:, :, 0], fc[:, :, 1], fc[:, :, 2], fc[:, :, 3], fc[:, :, 4], oh,
                             comp),
                 kv_tokens=kv_tokens, kv_gib=kv_gib, mem_ok=mem_ok, price=price, cap=cap,
                 seqs=seqs, budget=budget, block=block, g=g, draft=draft, deployable=dep,
                 quality=quality[e], flops_ok=flops_ok)


@dataclass
class PoolTable:
    """Metrics of every (unit, router option, replicas) of one pool role,
    arrays of shape (units, options, replicas)."""

    role: str
    units: Units
    opts: list[RouterOption]
    bounds_ok: np.ndarray
    est_ok: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self):
        return self.bounds_ok.shape


def _step(u: Units, perseq, n, q, a):
    """Step time with ``n`` decoding sequences and a prompt chunk of ``q``
    tokens (``a`` query-key pairs), the larger of the forms."""
    f = u.forms
    return col(f.oh) + np.maximum(
        *[col(f.c[:, k]) + col(f.wp[:, k]) * q + col(f.wa[:, k]) * a + perseq[k] * n
          for k in range(2)])


def _serve(u: Units, ws: WorkloadStats, rmax: int, loc: dict, z: float, hold_extra: float,
           iterations: int = 12):
    """A replica that decodes and prefills the prompts routed to it (``loc``:
    per request, the share of prompts, their tokens, query-key pairs, second
    moment). Steps are of two kinds: with a prompt chunk (while a prompt is
    pending, every step carries one) or decode only. Per second, chunk steps
    take rho_p = chunk steps x their length; decode-only steps fill the rest.
    TPOT = 1 / steps per second; running sequences n = rate x output x TPOT
    (Little), solved by iteration from below."""
    f = u.forms
    r = np.arange(1, rmax + 1, dtype=np.float64)[None, None, :]
    x = ws.rate / r
    g, draft = col(u.g), col(u.draft)
    budget = col(u.budget).astype(np.float64)
    perseq = [col((f.wb[:, k] + f.wc[:, k] * ws.lbar)
                   * np.where(f.compute_form[:, k], u.draft, 1.0)) for k in range(2)]
    share = loc["n"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_u = np.where(share > 0, loc["tok"] / np.maximum(share, 1e-12), 0.0)
        attn_u = np.where(share > 0, loc["attn"] / np.maximum(share, 1e-12), 0.0)

    def kinds(n):
        av = np.maximum(budget - n * draft, 1.0)
        cbar = np.where(share > 0, np.maximum(1.0, mean_u / av + 0.5), 0.0)
        q = np.where(cbar > 0, mean_u / np.maximum(cbar, 1e-12), 0.0)
        a = np.where(cbar > 0, attn_u / np.maximum(cbar, 1e-12), 0.0)
        tc = _step(u, perseq, n, q, a)
        td = _step(u, perseq, n, 0.0, 0.0)
        cs = x * share * cbar  # chunk steps per second
        rho = cs * tc
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(rho < 1, cs + (1 - rho) / td, 0.0)
        return av, cbar, tc, td, cs, rho, steps

    n = x * ws.eo / g * _step(u, perseq, 0.0, 0.0, 0.0)
    for _ in range(iterations):
        *_, steps = kinds(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            n_new = np.where(steps > 0, x * ws.eo / (g * steps), INF)
        n_new = np.minimum(n_new, 1e9)
        done = np.abs(n_new - n) <= 0.005 * n + 1e-3
        n = n_new
        if done.all():
            break
    av, cbar, tc, td, cs, rho, steps = kinds(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_chk = np.where(steps > 0, x * ws.eo / (g * steps), INF)
    converged = np.abs(n_chk - n) <= 0.02 * n + 1e-2
    tau = np.where(steps > 0, 1.0 / np.maximum(steps, 1e-12), INF)
    slots = np.minimum(u.seqs, np.floor((u.kv_tokens - ws.q_total) / (ws.lbar + u.block / 2.0)))
    slots = col(np.maximum(slots, 0))
    stable = converged & (steps > 0) & (rho < 1) & (n < slots) & (budget - n * draft >= 1)
    # a percentile request: a fuller batch, and its share of chunk steps over its output
    n_p = np.minimum(slots, n + z * np.sqrt(np.maximum(n, 0)))
    _, _, tc_p, td_p, cs_p, rho_p, steps_p = kinds(n_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = np.where(steps_p > 0, 1.0 / (g * np.maximum(steps_p, 1e-12)), INF)
        frac = np.where(steps_p > 0, np.clip(cs_p / np.maximum(steps_p, 1e-12), 0, 1), 1.0)
    spread = np.sqrt(frac * (1 - frac) / max(ws.o_low, 1.0)) * np.maximum(tc_p - td_p, 0) / g
    tpot_p = np.where(np.isfinite(mean_p), mean_p + z * spread, INF)
    offered = ws.rate * (ws.eo / g * tau + hold_extra)
    blocking = erlang_b(slots * r, offered)
    floor_tpot = _step(u, perseq, 1.0, 0.0, 0.0) / g
    memory_bound = (col(f.c[:, 1]) + perseq[1] * n) >= (col(f.c[:, 0]) + perseq[0] * n)
    shape = np.broadcast_shapes(tau.shape, slots.shape)
    return dict(tau=tau, n=n, slots=np.broadcast_to(slots, shape), tpot_p=tpot_p,
                blocking=blocking, stable=stable, floor_tpot=np.broadcast_to(floor_tpot, shape),
                kv_use=n * ws.lbar / col(np.maximum(u.kv_tokens, 1)),
                tokens=n * draft + np.where(cbar > 0, mean_u / np.maximum(cbar, 1e-12), 0) * (
                    cs * tau), memory_bound=memory_bound, perseq=perseq, avail=av, rho=rho,
                cbar=cbar, tc=tc, mean_u=mean_u)


def _prompt_time(u: Units, toks, chunk, extra_per_step, k: int):
    """Seconds of a prompt of ``toks`` uncached tokens in chunks of ``chunk``
    under form k, each step also carrying ``extra_per_step`` seconds of work."""
    f = u.forms
    steps = np.ceil(toks / np.maximum(chunk, 1))
    return (steps * (col(f.oh + f.c[:, k]) + extra_per_step) + col(f.wp[:, k]) * toks
            + col(f.wa[:, k]) * toks * (toks + 1) / 2)


def _queue(rho, mean_t, cv2, c, cmax: int, pct: float):
    """M/G/c waiting time: mean and the ``pct`` percentile (exponential tail)."""
    a = np.minimum(rho, 0.999999) * c
    pw = erlang_c(c, a, cmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(rho < 1, pw * mean_t / (c * (1 - rho)) * (1 + cv2) / 2, INF)
        theta = np.where(pw > 0, w / pw, 0.0)
        tail = 1 - pct / 100
        wp = np.where(pw > tail, theta * np.log(np.maximum(pw, 1e-300) / tail), 0.0)
    return w, wp


def decode_table(u: Units, opts, ws: WorkloadStats, slo: SLO, rmax: int, colocated: bool,
                 hops: float) -> PoolTable:
    """Decode pools (disaggregated: with the prompts the cost policy keeps
    local) or colocated pools (every prompt)."""
    z = z_of(slo.tpot_pct)
    loc = {"n": ws.loc_n[None], "tok": ws.loc_tok[None], "attn": ws.loc_attn[None]}
    m = _serve(u, ws, rmax, loc, z, slo.ttft_s)
    r = np.arange(1, rmax + 1)[None, None, :]
    within_cap = r <= col(u.cap)
    unit_ok = col(u.mem_ok & u.flops_ok & (u.kv_tokens >= ws.q_total))
    perseq_n = [m["perseq"][k] * m["n"] for k in range(2)]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_u = m["mean_u"]
        m2 = np.where(ws.loc_n > 0, ws.loc_m2 / np.maximum(ws.loc_n, 1e-12), 0.0)[None]
        cv2 = np.maximum(0.0, m2 / np.maximum(mean_u, 1e-9) ** 2 - 1)
        mean_t = m["cbar"] * m["tc"]  # a prompt's chunk steps back to back
    rho = m["rho"]
    # each replica queues its own prompts: the router places by decode load, not by them
    w, wp = _queue(rho, mean_t, cv2, np.ones_like(rho, dtype=np.int64), 1, slo.ttft_pct)
    chunk = m["avail"]
    own_p = np.maximum(*[_prompt_time(u, ws.loc_up[None], chunk, perseq_n[k], k) for k in range(2)])
    own_m = np.maximum(*[_prompt_time(u, mean_u, chunk, perseq_n[k], k) for k in range(2)])
    ttft_local = np.maximum(own_p + w, own_m + wp) + m["tau"] / 2 + hops
    local_matters = (ws.loc_n >= 1 - slo.ttft_pct / 100)[None]
    ttft_local = np.where(local_matters, ttft_local, 0.0)
    floor_ttft = np.where(local_matters, np.maximum(
        *[_prompt_time(u, ws.loc_up[None], col(u.budget), 0.0, k) for k in range(2)]), 0.0)
    stable = m["stable"]
    bounds_ok = (unit_ok & within_cap & stable & (m["floor_tpot"] <= slo.tpot_s)
                 & (floor_ttft <= slo.ttft_s))
    tail = 1 - slo.tpot_pct / 100
    est_ok = bounds_ok & (m["blocking"] <= min(0.02, tail / 4))
    shape = bounds_ok.shape
    metrics = dict(tau=m["tau"], n=m["n"], slots=m["slots"], tpot_p=m["tpot_p"],
                   blocking=m["blocking"], kv_use=m["kv_use"], ttft_local=ttft_local,
                   prefill_rho=np.broadcast_to(np.where(np.isfinite(rho), rho, 9.9), shape),
                   memory_bound=np.broadcast_to(m["memory_bound"], shape), tokens=m["tokens"],
                   cost=np.broadcast_to(col(u.price) * r, shape))
    return PoolTable("colocated" if colocated else "decode", u, opts, bounds_ok, est_ok, metrics)


def prefill_table(u: Units, opts, ws: WorkloadStats, slo: SLO, rmax: int,
                  nic_bytes_per_s: np.ndarray, kv_bytes_per_token: np.ndarray) -> PoolTable:
    f = u.forms
    r = np.arange(1, rmax + 1, dtype=np.float64)[None, None, :]
    rem_n = ws.rem_n[None]
    y = ws.rate * rem_n / r
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_u = np.where(rem_n > 0, ws.rem_tok[None] / np.maximum(rem_n, 1e-12), 0.0)
        attn_per_prompt = np.where(rem_n > 0, ws.rem_attn[None] / np.maximum(rem_n, 1e-12), 0.0)
        a_bar = np.where(mean_u > 0, attn_per_prompt / np.maximum(mean_u, 1e-12), 0.0)
        m2 = np.where(rem_n > 0, ws.rem_m2[None] / np.maximum(rem_n, 1e-12), 0.0)
    taus = []
    for k in range(2):
        beta = y * (col(f.wp[:, k]) * mean_u + col(f.wa[:, k]) * attn_per_prompt)
        with np.errstate(divide="ignore", invalid="ignore"):
            taus.append(np.where(beta < 1, col(f.oh + f.c[:, k]) / (1 - beta), INF))
    tau_s = np.maximum(*taus)
    b = col(u.budget).astype(np.float64)
    tau_b = col(f.oh) + np.maximum(*[col(f.c[:, k]) + col(f.wp[:, k]) * b
                                      + col(f.wa[:, k]) * b * a_bar for k in range(2)])
    mu = b / tau_b
    rho = y * mean_u / mu
    with np.errstate(divide="ignore", invalid="ignore"):
        cv2 = np.where(mean_u > 0, np.maximum(0.0, m2 / np.maximum(mean_u, 1e-9) ** 2 - 1), 0.0)
    servers = np.where(np.array([o.policy == "round_robin" for o in opts])[None, :, None], 1, r)
    w, wp = _queue(rho, mean_u / mu, cv2, servers, rmax, slo.ttft_pct)
    own_p = np.maximum(*[_prompt_time(u, ws.rem_up[None], b, 0.0, k) for k in range(2)])
    own_m = np.maximum(*[_prompt_time(u, mean_u, b, 0.0, k) for k in range(2)])
    ttft = np.maximum(own_p + w, own_m + wp) + np.where(np.isfinite(tau_s), tau_s / 2, 0.0)
    # the KV hand-off of every remote prompt leaves through these replicas' NICs
    handoff = ws.rate * rem_n * ws.rem_imean[None] * col(kv_bytes_per_token)
    net_ok = handoff <= 0.8 * col(nic_bytes_per_s) * r * col(u.tp)
    within_cap = r <= col(u.cap)
    unit_ok = col(u.mem_ok & u.flops_ok & (u.kv_tokens >= ws.max_prompt))
    idle = rem_n == 0
    stable = idle | (np.isfinite(tau_s) & (rho < 1))
    floor = np.where(idle, 0.0, own_p)
    bounds_ok = unit_ok & within_cap & stable & net_ok & (floor <= slo.ttft_s)
    ttft = np.where(idle, 0.0, ttft)
    shape = bounds_ok.shape
    metrics = dict(ttft_p=ttft, rho=np.broadcast_to(np.where(idle, 0.0, rho), shape),
                   tau_s=tau_s, mu=np.broadcast_to(mu, shape),
                   memory_bound=np.broadcast_to(taus[1] >= taus[0], shape),
                   full_step_memory_bound=np.broadcast_to(
                       (col(f.c[:, 1]) + col(f.wp[:, 1]) * b)
                       >= (col(f.c[:, 0]) + col(f.wp[:, 0]) * b), shape),
                   cost=np.broadcast_to(col(u.price) * r, shape))
    return PoolTable("prefill", u, opts, bounds_ok, bounds_ok.copy(), metrics)
