"""The planner's candidate records: one numpy record per (layout, pools,
replicas, router option) combination the estimate kept, with its cost and
predicted latency, and how the cheapest distinct allocations are picked
from millions of them."""

from __future__ import annotations

import numpy as np

from splitserve.cluster.planning.planner.inputs import SLO

KEEP = 20_000  # cheapest candidates kept from the estimate
CLOUD = 4_000  # estimated points kept for the plot


def col(x):
    """A per-unit vector as [units, 1, 1], to broadcast over (option, replicas)."""
    return np.asarray(x)[:, None, None]


def fitted(units, i: int) -> bool:
    """The unit's step model is one measured line (its two forms are equal)."""
    f = units.forms
    return bool(f.c[i, 0] == f.c[i, 1] and f.wp[i, 0] == f.wp[i, 1] and f.wb[i, 0] == f.wb[i, 1])


CAND_DTYPE = np.dtype([("layout", "i1"), ("pu", "i8"), ("pr", "i4"), ("du", "i8"), ("dr", "i4"),
                       ("o", "i2"), ("cost", "f8"), ("ttft", "f8"), ("tpot", "f8"),
                       ("dep", "?"), ("ok", "?"), ("q", "f8")])


def cand_array(n: int) -> np.ndarray:
    return np.zeros(n, dtype=CAND_DTYPE)


def score(rec: np.ndarray, slo: SLO) -> np.ndarray:
    """Latency against the SLOs (1.0: on an SLO); lower is better."""
    return np.maximum(rec["ttft"] / slo.ttft_s, rec["tpot"] / slo.tpot_s)


def cheapest(rec: np.ndarray, k: int, slo: SLO, units=None) -> np.ndarray:
    """The ``k`` cheapest hardware allocations of ``rec``, each by its
    best-predicted settings per quality class (ties: lower latency)."""
    if len(rec) == 0:
        return rec
    lat = np.minimum(score(rec, slo), 10.0)
    if units is not None:
        alloc = alloc_key(rec, units)
        order = np.lexsort((lat, alloc))
        first = np.unique(alloc[order], return_index=True)[1]
        rec = rec[order[first]]
        lat = lat[order[first]]
    if len(rec) <= k:
        return rec
    part = np.argpartition(rec["cost"] + 1e-6 * lat, k)[:k]
    return rec[part]


def alloc_key(rec: np.ndarray, units) -> np.ndarray:
    """One integer per (layout, devices, TP and replicas of each pool, quality class)."""
    col, dec, pre, kv_of = units
    lay = rec["layout"].astype(np.int64)
    du = rec["du"]
    dev_d = np.where(lay == 0, col.dev[np.minimum(du, len(col) - 1)] if col is not None else 0,
                     dec.dev[np.minimum(du, len(dec) - 1)] if dec is not None else 0)
    tp_d = np.where(lay == 0, col.tp[np.minimum(du, len(col) - 1)] if col is not None else 0,
                    dec.tp[np.minimum(du, len(dec) - 1)] if dec is not None else 0)
    e_d = np.where(lay == 0, col.e[np.minimum(du, len(col) - 1)] if col is not None else 0,
                   dec.e[np.minimum(du, len(dec) - 1)] if dec is not None else 0)
    pu = np.maximum(rec["pu"], 0)
    dev_p = np.where(lay == 1, pre.dev[np.minimum(pu, len(pre) - 1)], 0) if pre is not None else 0
    tp_p = np.where(lay == 1, pre.tp[np.minimum(pu, len(pre) - 1)], 0) if pre is not None else 0
    key = lay
    for v, n in ((dev_d, 64), (tp_d, 16), (rec["dr"], 1024), (dev_p, 64), (tp_p, 16),
                 (rec["pr"], 1024), (kv_of[e_d], 16)):
        key = key * n + np.asarray(v, dtype=np.int64)
    return key
