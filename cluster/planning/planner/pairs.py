"""Disaggregated plans, pair by pair: every (prefill row, decode row) of the
estimate's tables that share the hand-off's settings (block size, KV and
weight dtypes; each pool has its own batch cap and chunk size) and a router
option, counted against
the bounds by histograms of devices used (never enumerated), and scored in
vectorised chunks (TTFT with the hand-off, TPOT, memory fit, cost)."""

from __future__ import annotations

import numpy as np

from splitserve.cluster.planning.planner.devices import DEVICES_PER_NODE
from splitserve.cluster.planning.planner.estimate import RPC_S
from splitserve.cluster.planning.planner.candidates import CLOUD, KEEP, cand_array, cheapest, col

PAIR_CHUNK = 2_000_000  # (prefill, decode) pairs scored at once


def count_pairs(devices, grid, up, okp, ud, okd, n_opts, budget):
    """(deployable, all) (prefill row, decode row) pairs that pass the bounds:
    same shared settings (``grid.shared_key``) and router option, within the offers' counts and
    the budget; counted by histograms of devices used, not enumerated."""
    ndev = len(devices)
    gmax = int(max(d.count for d in devices))
    ngroup = int(grid.shared_key.max() + 1) * n_opts
    res = []
    for dep_only in (True, False):
        hp = np.zeros((ngroup, ndev, gmax + 1), dtype=np.int64)
        hd = np.zeros((ngroup, ndev, gmax + 2), dtype=np.int64)
        for (units, ok, h) in ((up, okp, hp), (ud, okd, hd)):
            mask = ok & (col(units.deployable) if dep_only else True)
            ui, oi, ri = np.nonzero(mask)
            g = grid.shared_key[units.e[ui]] * n_opts + oi
            gpus = (ri + 1) * units.tp[ui]
            np.add.at(h, (g, units.dev[ui], gpus), 1)
        cum = np.cumsum(hd, axis=2)  # cum[..., k]: decode rows using <= k devices
        total = 0
        gp = np.arange(gmax + 1)
        for i, di in enumerate(devices):
            for j, dj in enumerate(devices):
                cap = np.full(gmax + 1, dj.count)
                if i == j:
                    cap = np.minimum(cap, di.count - gp)
                if np.isfinite(budget):
                    room = budget - gp * di.price
                    cap = np.minimum(cap, np.floor(room / dj.price + 1e-9)
                                     if dj.price > 0 else np.where(room >= 0, gmax, -1))
                cap = np.clip(cap, -1, gmax + 1).astype(np.int64)
                usable = np.where(cap >= 0, cum[:, j, np.maximum(cap, 0)], 0)
                total += int((hp[:, i, :] * usable).sum())
        res.append(total)
    return res


def score_pairs(devices, grid, quality, units_key, slack, grpc, up, tp_, ud, td, ws, opts, slo,
                budget, kvbpt, cpu_kv, states, rng):
    """The (prefill row, decode row) pairs whose estimate meets the SLOs (within
    ``slack``), scored in chunks of about PAIR_CHUNK: ((deployable, all) counts
    within the SLOs, the cheapest records of each chunk, a sample for the plot).
    ``kvbpt``/``cpu_kv``: hand-off bytes per token by KV dtype on GPU/CPU pools;
    ``states``: per request (a hybrid's recurrent states), on GPU and CPU pools."""
    n_opts = len(opts)
    mp, md = tp_.metrics, td.metrics
    pi, variants = _prefill_variants(grid, up, tp_)
    di = np.flatnonzero(td.est_ok)
    pu, po, pr = np.unravel_index(pi, tp_.shape)
    du, do, dr = np.unravel_index(di, td.shape)
    gp = grid.shared_key[up.e[pu]] * n_opts + po
    gd = grid.shared_key[ud.e[du]] * n_opts + do
    order = np.argsort(gp, kind="stable")
    pi, pu, po, pr, gp = pi[order], pu[order], po[order], pr[order], gp[order]
    variants = variants[order]
    start = np.searchsorted(gp, gd, "left")
    end = np.searchsorted(gp, gd, "right")
    nper = end - start
    counts_dev = np.array([d.count for d in devices])
    price = np.array([d.price for d in devices])
    intra = np.array([d.hw.intra_node_bandwidth for d in devices])
    nic = np.array([d.hw.network_bandwidth * d.hw.efficiency.network for d in devices])
    cpu = np.array([d.cpu for d in devices])
    tail_t = 1 - slo.ttft_pct / 100
    ok_dep = ok_all = 0
    recs, cloud = [], []
    # chunks of decode rows holding about PAIR_CHUNK pairs
    csum = np.cumsum(nper)
    bounds_at = np.searchsorted(csum, np.arange(PAIR_CHUNK, csum[-1] + PAIR_CHUNK, PAIR_CHUNK)
                                ) if len(csum) and csum[-1] else np.array([], dtype=np.int64)
    lo = 0
    for hi in list(bounds_at + 1) + [len(di)]:
        hi = min(hi, len(di))
        if hi <= lo:
            continue
        j = np.arange(lo, hi)
        n = nper[j]
        tot = int(n.sum())
        lo = hi
        if tot == 0:
            continue
        jj = np.repeat(j, n)
        off = np.repeat(np.cumsum(n) - n, n)
        ii = start[jj] + (np.arange(tot) - off)
        a_u, a_o, a_r = pu[ii], po[ii], pr[ii]
        b_u, b_r = du[jj], dr[jj]
        dev_p, dev_d = up.dev[a_u], ud.dev[b_u]
        g_p = (a_r + 1) * up.tp[a_u]
        g_d = (b_r + 1) * ud.tp[b_u]
        same = dev_p == dev_d
        count_ok = ~same | (g_p + g_d <= counts_dev[dev_p])
        cost = g_p * price[dev_p] + g_d * price[dev_d]
        keep = count_ok & (cost <= budget)
        if not keep.any():
            continue
        sel = np.flatnonzero(keep)
        a_u, a_o, a_r, b_u, b_r = a_u[sel], a_o[sel], a_r[sel], b_u[sel], b_r[sel]
        a_v = variants[ii[sel]]
        dev_p, dev_d, g_p, g_d, same, cost = (dev_p[sel], dev_d[sel], g_p[sel], g_d[sel],
                                              same[sel], cost[sel])
        pflat = pi[ii[sel]]
        dflat = di[jj[sel]]
        kv = np.where(cpu[dev_p], cpu_kv[grid.kv[ud.e[b_u]]], kvbpt[grid.kv[ud.e[b_u]]])
        bw = np.where(same & (g_p + g_d <= DEVICES_PER_NODE), intra[dev_p],
                      np.minimum(nic[dev_p], nic[dev_d]) * 4)
        if grpc is not None:
            bw = np.where(cpu[dev_p], np.minimum(bw, grpc), bw)
        rem_n = ws.rem_n[a_o, a_r]
        xfer = (ws.rem_ip[a_o, a_r] * kv + np.where(cpu[dev_p], states[1], states[0])) / bw
        matters = rem_n >= tail_t
        after = xfer + md["tau"].ravel()[dflat] + 4 * RPC_S  # behind the prefill pool
        remote = np.where(matters, mp["ttft_p"].ravel()[pflat] + after, 0.0)
        local = md["ttft_local"].ravel()[dflat]
        ttft = np.maximum(remote, local)
        tpot = md["tpot_p"].ravel()[dflat]
        # each pool sizes its own KV cache (its engine's kv_cache_memory_gb): the decode
        # table's bounds hold its batch, the prefill table's a prompt
        ok1 = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)
        oks = (ttft <= slo.ttft_s * slack) & (tpot <= slo.tpot_s * slack)
        dep = up.deployable[a_u] & ud.deployable[b_u]
        # the prefill row stands for its chunk sizes: count those within the TTFT SLO too
        room = np.where(matters, slo.ttft_s - after, np.inf)[:, None]
        n_ok = np.where((local <= slo.ttft_s) & (tpot <= slo.tpot_s),
                        (a_v <= room).sum(axis=1), 0)
        ok_dep += int(n_ok[dep].sum())
        ok_all += int(n_ok.sum())
        s = np.flatnonzero(oks)
        rec = cand_array(len(s))
        rec["layout"] = 1
        rec["pu"], rec["pr"], rec["o"] = a_u[s], a_r[s] + 1, a_o[s]
        rec["du"], rec["dr"] = b_u[s], b_r[s] + 1
        rec["cost"], rec["ttft"], rec["tpot"] = cost[s], ttft[s], tpot[s]
        rec["dep"], rec["ok"] = dep[s], ok1[s]
        rec["q"] = quality[ud.e[b_u[s]]]
        recs.append(cheapest(rec, KEEP, slo, units_key))
        recs.append(cheapest(rec[rec["dep"]], KEEP, slo, units_key))
        cloud.append(rec[rng.permutation(len(rec))[:CLOUD // 8]])
    return (ok_dep, ok_all), recs, cloud


def _prefill_variants(grid, up, tp_):
    """The prefill table's rows within the estimate (flat indices), one per
    (device, TP, shared settings, router option, replicas): the chunk size with
    the lowest estimated TTFT stands for the others, which differ from it in
    nothing a pair is scored on but their TTFT. Returns those rows and, for
    each, the TTFTs of all its chunk sizes (ascending, inf padded), so pairs
    are scored once per prefill allocation and counted for every chunk size."""
    flat = np.flatnonzero(tp_.est_ok)
    if not len(flat):  # no prefill row within the estimate: no pair either
        return flat, np.empty((0, 1))
    pu, po, pr = np.unravel_index(flat, tp_.shape)
    ttft = tp_.metrics["ttft_p"].ravel()[flat]
    _, alloc = np.unique(np.stack([up.dev, up.tp, grid.shared_key[up.e]]), axis=1,
                         return_inverse=True)
    key = (alloc.ravel()[pu] * tp_.shape[1] + po) * tp_.shape[2] + pr
    order = np.lexsort((ttft, key))
    key, flat, ttft = key[order], flat[order], ttft[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    group = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    rank = np.arange(len(key)) - first[group]
    width = int(rank.max()) + 1 if len(rank) else 1
    variants = np.full((len(first), width), np.inf)
    variants[group, rank] = ttft
    return flat[first], variants
