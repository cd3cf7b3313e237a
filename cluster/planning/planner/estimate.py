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

from dataclasses import dataclass, field

import numpy as np

from splitserve.cluster.planning.planner.candidates import col
from splitserve.cluster.planning.planner.inputs import SLO, z_of
from splitserve.cluster.planning.planner.queueing import erlang_b, mgc_wait
from splitserve.cluster.planning.planner.space import RouterOption
from splitserve.cluster.planning.planner.units import Units
from splitserve.cluster.planning.planner.workload_stats import WorkloadStats

RPC_S = 0.0005  # one hop, as the simulator's default
INF = float("inf")


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


def _step(u: Units, dec, q, a, tokens):
    """Step time with decode work ``dec`` (per form: the decoding sequences'
    seconds, ``_decode_work``) and a prompt chunk of ``q`` tokens (``a``
    query-key pairs), the larger of the forms; ``tokens``, all the step's
    tokens, choose the experts a mixture of experts reads (``Forms.skipped``)."""
    f = u.forms
    skip = f.skipped(tokens)
    return col(f.oh) + np.maximum(
        *[col(f.c[:, k]) + col(f.wp[:, k]) * q + col(f.wa[:, k]) * a + dec[k] - skip[k]
          for k in range(2)])


def _speculation(u: Units, n):
    """Per sequence at a running batch of ``n``: tokens per step and tokens
    verified per step (k + 1), k the length the engine's rule settles on at
    that batch size (``Units.spec_k``; 0 and 1 token without speculation)."""
    width = u.spec_k.shape[1]
    idx = np.clip(np.rint(np.nan_to_num(np.asarray(n, dtype=np.float64), nan=0.0,
                                        posinf=width - 1)), 0, width - 1).astype(np.int64)
    row = col(u.spec_row)
    return u.spec_g[row, idx], u.spec_k[row, idx] + 1.0


def _decode_work(u: Units, perseq, n, draft):
    """Each form's seconds for ``n`` decoding sequences verifying ``draft``
    tokens each: the compute form pays every verified token, the memory
    form reads each context once."""
    f = u.forms
    return [perseq[k] * np.where(col(f.compute_form[:, k]), draft, 1.0) * n for k in range(2)]


def _serve(u: Units, ws: WorkloadStats, rmax: int, loc: dict, z: float, hold_extra: float,
           iterations: int = 12):
    """A replica that decodes and prefills the prompts routed to it (``loc``:
    per request, the share of prompts, their tokens, query-key pairs, second
    moment). Steps are of two kinds: with a prompt chunk (while a prompt is
    pending, every step carries one) or decode only. Per second, chunk steps
    take rho_p = chunk steps x their length; decode-only steps fill the rest.
    TPOT = 1 / (steps per second x tokens per step); running sequences n =
    rate x output x TPOT (Little), solved by iteration from below. With
    speculation the tokens per step and the verified tokens follow the
    batch size by the engine's length rule (``_speculation``)."""
    f = u.forms
    r = np.arange(1, rmax + 1, dtype=np.float64)[None, None, :]
    x = ws.rate / r
    budget = col(u.budget).astype(np.float64)
    perseq = [col(f.wb[:, k] + f.wc[:, k] * ws.lbar) for k in range(2)]
    share = loc["n"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_u = np.where(share > 0, loc["tok"] / np.maximum(share, 1e-12), 0.0)
        attn_u = np.where(share > 0, loc["attn"] / np.maximum(share, 1e-12), 0.0)

    def kinds(n):
        g, draft = _speculation(u, n)
        dec = _decode_work(u, perseq, n, draft)
        av = np.maximum(budget - n * draft, 1.0)
        cbar = np.where(share > 0, np.maximum(1.0, mean_u / av + 0.5), 0.0)
        q = np.where(cbar > 0, mean_u / np.maximum(cbar, 1e-12), 0.0)
        a = np.where(cbar > 0, attn_u / np.maximum(cbar, 1e-12), 0.0)
        tc = _step(u, dec, q, a, n * draft + q)
        td = _step(u, dec, 0.0, 0.0, n * draft)
        cs = x * share * cbar  # chunk steps per second
        rho = cs * tc
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(rho < 1, cs + (1 - rho) / td, 0.0)
        return g, draft, dec, av, cbar, tc, td, cs, rho, steps

    # from below: the step of an empty batch, at the most tokens per step (batch 1's)
    g1, _ = _speculation(u, 1.0)
    n = x * ws.eo / g1 * _step(u, [0.0, 0.0], 0.0, 0.0, 1.0)
    for _ in range(iterations):
        g, *_, steps = kinds(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            n_new = np.where(steps > 0, x * ws.eo / (g * steps), INF)
        n_new = np.minimum(n_new, 1e9)
        done = np.abs(n_new - n) <= 0.005 * n + 1e-3
        n = n_new
        if done.all():
            break
    g, draft, dec, av, cbar, tc, td, cs, rho, steps = kinds(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_chk = np.where(steps > 0, x * ws.eo / (g * steps), INF)
    converged = np.abs(n_chk - n) <= 0.02 * n + 1e-2
    tau = np.where(steps > 0, 1.0 / np.maximum(steps, 1e-12), INF)
    slots = np.minimum(u.seqs, np.floor((u.kv_tokens - ws.q_total) / (ws.lbar + u.block / 2.0)))
    slots = col(np.maximum(slots, 0))
    stable = converged & (steps > 0) & (rho < 1) & (n < slots) & (budget - n * draft >= 1)
    # a percentile request: a fuller batch (speculating as the rule does at its size),
    # and its share of chunk steps over its output
    n_p = np.minimum(slots, n + z * np.sqrt(np.maximum(n, 0)))
    g_p, _, _, _, _, tc_p, td_p, cs_p, rho_p, steps_p = kinds(n_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = np.where(steps_p > 0, 1.0 / (g_p * np.maximum(steps_p, 1e-12)), INF)
        frac = np.where(steps_p > 0, np.clip(cs_p / np.maximum(steps_p, 1e-12), 0, 1), 1.0)
    spread = np.sqrt(frac * (1 - frac) / max(ws.o_low, 1.0)) * np.maximum(tc_p - td_p, 0) / g_p
    tpot_p = np.where(np.isfinite(mean_p), mean_p + z * spread, INF)
    offered = ws.rate * (ws.eo / g * tau + hold_extra)
    blocking = erlang_b(slots * r, offered)
    _, draft1 = _speculation(u, 1.0)
    floor_tpot = _step(u, _decode_work(u, perseq, 1.0, draft1), 0.0, 0.0, draft1) / g1
    skip = f.skipped(n * draft)
    memory_bound = (col(f.c[:, 1]) + dec[1] - skip[1]) >= (col(f.c[:, 0]) + dec[0] - skip[0])
    shape = np.broadcast_shapes(tau.shape, slots.shape)
    return dict(tau=tau, n=n, slots=np.broadcast_to(slots, shape), tpot_p=tpot_p,
                blocking=blocking, stable=stable, floor_tpot=np.broadcast_to(floor_tpot, shape),
                kv_use=n * ws.lbar / col(np.maximum(u.kv_tokens, 1)),
                tokens=n * draft + np.where(cbar > 0, mean_u / np.maximum(cbar, 1e-12), 0) * (
                    cs * tau), memory_bound=memory_bound, dec=dec, avail=av, rho=rho,
                cbar=cbar, tc=tc, mean_u=mean_u, spec_k=draft - 1.0)


def _prompt_time(u: Units, toks, chunk, extra_per_step, k: int):
    """Seconds of a prompt of ``toks`` uncached tokens in chunks of ``chunk``
    under form k, each step also carrying ``extra_per_step`` seconds of work."""
    f = u.forms
    steps = np.ceil(toks / np.maximum(chunk, 1))
    return (steps * (col(f.oh + f.c[:, k]) + extra_per_step) + col(f.wp[:, k]) * toks
            + col(f.wa[:, k]) * toks * (toks + 1) / 2)


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
    perseq_n = m["dec"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_u = m["mean_u"]
        m2 = np.where(ws.loc_n > 0, ws.loc_m2 / np.maximum(ws.loc_n, 1e-12), 0.0)[None]
        cv2 = np.maximum(0.0, m2 / np.maximum(mean_u, 1e-9) ** 2 - 1)
        mean_t = m["cbar"] * m["tc"]  # a prompt's chunk steps back to back
    rho = m["rho"]
    # each replica queues its own prompts: the router places by decode load, not by them
    w, wp = mgc_wait(rho, mean_t, cv2, np.ones_like(rho, dtype=np.int64), 1, slo.ttft_pct)
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
    if (u.spec_row == 0).any():
        # speculation whose length rule drafts nothing at the estimated batch is the
        # same plan as speculation off (in the space too), less a setting: not a candidate
        est_ok &= ~((col(u.spec_row) > 0) & (m["spec_k"] == 0))
    shape = bounds_ok.shape
    metrics = dict(tau=m["tau"], n=m["n"], slots=m["slots"], tpot_p=m["tpot_p"],
                   blocking=m["blocking"], kv_use=m["kv_use"], ttft_local=ttft_local,
                   prefill_rho=np.broadcast_to(np.where(np.isfinite(rho), rho, 9.9), shape),
                   memory_bound=np.broadcast_to(m["memory_bound"], shape), tokens=m["tokens"],
                   spec_k=np.broadcast_to(m["spec_k"], shape),
                   cost=np.broadcast_to(col(u.price) * r, shape))
    return PoolTable("colocated" if colocated else "decode", u, opts, bounds_ok, est_ok, metrics)


def prefill_table(u: Units, opts, ws: WorkloadStats, slo: SLO, rmax: int,
                  nic_bytes_per_s: np.ndarray, kv_bytes_per_token: np.ndarray,
                  state_bytes: np.ndarray) -> PoolTable:
    """``kv_bytes_per_token``, ``state_bytes``: per unit, what one hand-off
    carries per prompt token and per request (a hybrid's recurrent states)."""
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
    w, wp = mgc_wait(rho, mean_u / mu, cv2, servers, rmax, slo.ttft_pct)
    own_p = np.maximum(*[_prompt_time(u, ws.rem_up[None], b, 0.0, k) for k in range(2)])
    own_m = np.maximum(*[_prompt_time(u, mean_u, b, 0.0, k) for k in range(2)])
    ttft = np.maximum(own_p + w, own_m + wp) + np.where(np.isfinite(tau_s), tau_s / 2, 0.0)
    # the KV hand-off of every remote prompt (and its states) leaves through these NICs
    handoff = ws.rate * rem_n * (ws.rem_imean[None] * col(kv_bytes_per_token) + col(state_bytes))
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
