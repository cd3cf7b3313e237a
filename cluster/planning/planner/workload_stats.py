"""The workload as the estimate reads it: per router option and size of the
pool that prefills, the prompt work that stays on decode replicas (local)
and goes to prefill replicas (remote), and the moments and quantiles of
prompt and output lengths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.planner.inputs import WorkloadModel
from splitserve.cluster.planning.planner.space import RouterOption

INF = float("inf")


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
