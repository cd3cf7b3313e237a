"""Paged attention for the CPU backend: short queries batched.

``reference.paged_attention`` attends one sequence at a time with its KV
heads repeated to the query heads: right for long prompt chunks, but a
speculative verify step gives every sequence ``k + 1`` query tokens, and
for those the per-sequence loop (a gather, two ``repeat_interleave`` copies
and one SDPA call per sequence and layer) costs several times the
attention itself. Here the sequences with at most ``SHORT_QUERY`` new
tokens are grouped by that count and each group runs as one SDPA call,
the way ``reference.paged_decode_attention`` runs one-token sequences:
blocks gathered to the group's longest context, query heads grouped per KV
head (no copies for GQA), a causal mask per query position. Longer chunks
go to the reference one by one. Same signature and result as
``reference.paged_attention`` (``tests/unit/test_cpu_attention.py``).
"""

from __future__ import annotations

import torch

from splitserve.kernels import reference

SHORT_QUERY = 16  # most new tokens of a sequence batched here (a verify step: k + 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0, sliding_window: int = 0,
                    softcap: float = 0.0, sinks: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """As ``reference.paged_attention``. q: [T, Hq, D] -> [T, Hq, D]."""
    cu = cu_query_lens.tolist()
    ctx = context_lens.tolist()
    groups: dict[int, list[int]] = {}  # query length -> sequences
    long: list[int] = []
    for b in range(len(ctx)):
        n = cu[b + 1] - cu[b]
        if 0 < n <= SHORT_QUERY:
            groups.setdefault(n, []).append(b)
        elif n > SHORT_QUERY:
            long.append(b)
    out = torch.zeros_like(q)  # a sequence without new tokens contributes no rows
    for n, seqs in groups.items():
        rows = torch.tensor([cu[b] + i for b in seqs for i in range(n)], device=q.device)
        out[rows] = _short_queries(q[rows], n, k_cache, v_cache, block_tables, seqs, ctx,
                                   scale, k_scale, v_scale, sliding_window, softcap, sinks=sinks,
                                   alibi_slopes=alibi_slopes)
    for b in long:
        s, e = cu[b], cu[b + 1]
        out[s:e] = reference.paged_attention(
            q[s:e], k_cache, v_cache, block_tables[b:b + 1],
            torch.tensor([0, e - s], dtype=torch.int32), context_lens[b:b + 1],
            scale, k_scale, v_scale, sliding_window, softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    return out


def _short_queries(q: torch.Tensor, n: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, seqs: list[int], ctx: list[int], scale: float,
                   k_scale: float, v_scale: float, sliding_window: int,
                   softcap: float = 0.0, sinks: torch.Tensor | None = None,
                   alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B * n, Hq, D], the last n tokens of each of ``seqs`` -> [B * n, Hq, D]."""
    b, (_, hq, d) = len(seqs), q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    g = hq // hk
    lens = [ctx[i] for i in seqs]
    nblk = (max(lens) + bs - 1) // bs
    sel = torch.tensor(seqs, device=block_tables.device)
    tables = block_tables[sel, :nblk].reshape(-1).long()
    k = k_cache.index_select(0, tables).reshape(b, nblk * bs, hk, d).transpose(1, 2)
    v = v_cache.index_select(0, tables).reshape(b, nblk * bs, hk, d).transpose(1, 2)
    if k_cache.dtype in reference.FP8_DTYPES:
        k, v = k.to(torch.float32) * k_scale, v.to(torch.float32) * v_scale
    k, v = k.float(), v.float()  # [B, Hk, S, D], the reference's precision
    # [B, n, Hk, G, D] -> [B, Hk, n * G, D]: query heads grouped per KV head
    qg = q.float().view(b, n, hk, g, d).permute(0, 2, 1, 3, 4).reshape(b, hk, n * g, d)
    kpos = torch.arange(nblk * bs, device=q.device)  # [S]
    qpos = (torch.tensor(lens, device=q.device)[:, None] - n
            + torch.arange(n, device=q.device))[:, :, None]  # [B, n, 1]
    mask = kpos <= qpos  # [B, n, S]: causal, and past each context's end
    if sliding_window > 0:
        mask &= kpos > qpos - sliding_window
    mask = mask[:, None, :, None, :].expand(b, 1, n, g, nblk * bs).reshape(b, 1, n * g, -1)
    # each row's head's sink: rows ordered (token, head of the group) within a KV head
    row_sinks = (None if sinks is None
                 else sinks.view(hk, 1, g).expand(hk, n, g).reshape(1, hk, n * g, 1))
    bias = None
    if alibi_slopes is not None:  # [Hq, B, n, S] -> [B, Hk, n * G, S], as qg's rows
        bias = reference.alibi_bias(alibi_slopes, kpos, qpos).view(hk, g, b, n, -1)
        bias = bias.permute(2, 0, 3, 1, 4).reshape(b, hk, n * g, -1)
    o = reference.attend(qg, k, v, mask, scale, softcap, bias, sinks=row_sinks)
    return o.view(b, hk, n, g, d).permute(0, 2, 1, 3, 4).reshape(b * n, hq, d).to(q.dtype)
