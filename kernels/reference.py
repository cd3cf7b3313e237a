"""Torch reference implementations of the engine's hot-path ops.

These are the CPU path and the oracle every Triton kernel is tested against.
Each op's signature here is the contract: a kernel registered under the same
name in ``splitserve.kernels.dispatch`` must accept the same arguments and return the
same thing (or mutate the same tensors in place).

KV cache layout (one tensor for the whole model, so a hand-off of a sequence
is one gather):

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

``kv_cache[l, 0]`` is layer l's key cache, ``kv_cache[l, 1]`` its value cache;
a model whose keys are its values (multi-head latent attention's latent)
has one plane, ``kv_cache[l, 0]`` both (``ModelConfig.kv_planes``).
A token's *slot* is ``block_id * block_size + offset``. A cache stored in
``torch.float8_e4m3fn`` holds ``value / scale``; readers multiply by the scale.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FP8_DTYPES = (torch.float8_e4m3fn,)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K] (as checkpoints store it) -> x @ weight^T (+ bias): [M, N]."""
    return F.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    fp32_product: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with an optional fused residual add.

    x: [T, D], weight: [D]. Without ``residual`` returns (norm(x), None).
    With it, computes ``r = x + residual`` and returns (norm(r), r), the
    second being the new residual stream. Statistics in float32.

    Two rounding orders, as the model families' reference code has them:
    by default (Llama) the normed row is rounded to x.dtype, then multiplied
    by the weight as any torch multiply promotes (output in the promoted
    dtype); with ``fp32_product`` (Gemma, OLMo 2) the weight multiplies the
    float32 normed row and the product is rounded once, to x.dtype. In
    float32 the two are the same.
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    normed = xf * torch.rsqrt(var + eps)
    if fp32_product:
        return (normed * weight.float()).to(x.dtype), residual
    return weight * normed.to(x.dtype), residual


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding, applied in place.

    positions: [T] int64; q: [T, Hq, D]; k: [T, Hk, D];
    cos_sin_cache: [max_position, D] float32 holding cos in [:, :D/2] and
    sin in [:, D/2:]. Scaling (llama3, linear...) is already baked into the
    cache. Returns (q, k), the same tensors, rotated.

    Rounded as transformers' ``q * cos + rotate_half(q) * sin`` on tensors of
    q's dtype: cos and sin rounded to it, then each product and the sum (no
    rounding at all in float32).
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    for t in (q, k):
        dt = t.dtype
        cos = cs[:, None, :half].to(dt).float()
        sin = cs[:, None, half:].to(dt).float()
        x1 = t[..., :half].float()
        x2 = t[..., half:].float()
        o1 = (x1 * cos).to(dt).float() - (x2 * sin).to(dt).float()
        o2 = (x2 * cos).to(dt).float() + (x1 * sin).to(dt).float()
        t[..., :half] = o1.to(dt)
        t[..., half:] = o2.to(dt)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding [gate | up] -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding [gate | up] -> gelu_tanh(gate) * up: [T, I] (Gemma's
    GeGLU, the tanh approximation of GELU)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter new keys/values into their cache slots, in place.

    key, value: [T, Hk, D]; k_cache, v_cache: [NB, BS, Hk, D];
    slot_mapping: [T] int, -1 means "do not store" (padding).
    FP8 caches store value / scale.
    """
    nb, bs, hk, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kf = k_cache.view(nb * bs, hk, d)
    vf = v_cache.view(nb * bs, hk, d)
    kk, vv = key[keep], value[keep]
    if k_cache.dtype in FP8_DTYPES:
        # torch has no fp8 index_copy_ on CPU: copy the bytes
        lim = torch.finfo(k_cache.dtype).max  # saturate: e4m3fn has no inf
        kk = (kk.float() / k_scale).clamp(-lim, lim).to(k_cache.dtype).view(torch.uint8)
        vv = (vv.float() / v_scale).clamp(-lim, lim).to(v_cache.dtype).view(torch.uint8)
        kf.view(torch.uint8).index_copy_(0, slots, kk)
        vf.view(torch.uint8).index_copy_(0, slots, vv)
        return
    kf.index_copy_(0, slots, kk.to(k_cache.dtype))
    vf.index_copy_(0, slots, vv.to(v_cache.dtype))


def _gather_seq_kv(cache, block_table, ctx_len, scale, dtype):
    # cache: [NB, BS, Hk, D] -> [ctx_len, Hk, D] for one sequence
    bs = cache.shape[1]
    nblocks = (ctx_len + bs - 1) // bs
    blocks = cache.index_select(0, block_table[:nblocks].long())
    out = blocks.reshape(-1, cache.shape[2], cache.shape[3])[:ctx_len]
    if cache.dtype in FP8_DTYPES:
        return out.to(torch.float32).mul(scale).to(dtype)
    return out.to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float = 0.0, bias: torch.Tensor | None = None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scores) @ v over the keys ``mask`` lets each query see, where
    scores = q k^T * scale, soft-capped to ``softcap * tanh(scores / softcap)``
    when ``softcap`` > 0 (Gemma 2's attention logit cap, applied before the
    mask as transformers does), plus ``bias`` (float32, broadcastable to the
    scores: ALiBi's, added after the cap) when given. ``sinks``
    (broadcastable to [..., Sq, 1]): each query row's sink logit, a virtual
    key with no value that joins the softmax's denominator (gpt-oss); None:
    none. Shapes as ``F.scaled_dot_product_attention`` (q, k, v: [..., S,
    D], mask broadcastable to [..., Sq, Sk]); without a cap, a bias or sinks
    it is that call. A query that sees no key gets zeros."""
    if softcap <= 0 and bias is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores.float() + bias
    scores = scores.masked_fill(~mask, float("-inf")).float()
    if sinks is not None:
        sink = sinks.float().expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink's share is dropped: it has no value
    return torch.matmul(probs, v)


def alibi_bias(slopes: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """ALiBi's causal bias ``slope * (key position - query position)``:
    slopes [H] float32, kpos and qpos integer tensors broadcasting to each
    other -> float32 [H, *broadcast shape]. (Bloom's ``slope * key
    position`` differs from it by a constant per query row, which softmax
    removes.)"""
    rel = (kpos - qpos).to(torch.float32)
    return slopes.float().view(-1, *([1] * rel.dim())) * rel


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0, sliding_window: int = 0,
                    softcap: float = 0.0, sinks: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Variable-length causal attention over a paged KV cache.

    The batch holds B sequences; sequence b contributes the query tokens
    ``q[cu_query_lens[b]:cu_query_lens[b+1]]`` which are its *last* q_len
    tokens, and its whole context (prefix + new tokens, ``context_lens[b]``
    of them) is already stored in the cache at ``block_tables[b]``.
    Query i of sequence b sits at position ``context_lens[b] - q_len + i`` and
    attends to cache positions ``<=`` its own; with ``sliding_window`` W > 0
    only to the W latest of them (key j visible to query p iff p - W < j <= p,
    as Mistral and Qwen define the window). 0 means no window. ``softcap``
    > 0 caps each score at ``softcap * tanh(score / softcap)`` (``attend``).
    ``sinks``: [Hq] float32, each query head's sink logit joining its
    softmax's denominator (``attend``); None: none. ``alibi_slopes`` ([Hq]
    float32; None: no ALiBi) adds ``slope_h * (key position - query
    position)`` to head h's scores (``alibi_bias``).

    q: [T, Hq, D]; k_cache, v_cache: [NB, BS, Hk, D] (Hq % Hk == 0);
    block_tables: [B, max_blocks] int32; cu_query_lens: [B+1] int32;
    context_lens: [B] int32. Returns [T, Hq, D] in q.dtype.
    """
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    cu = cu_query_lens.tolist()
    ctx = context_lens.tolist()
    # one-token sequences (decoding beside prompts) go through the batched
    # decode path together; prompt chunks are attended one by one
    single = [b for b in range(len(ctx)) if cu[b + 1] - cu[b] == 1]
    if len(single) > 1:
        rows = torch.tensor([cu[b] for b in single], device=q.device)
        sel = torch.tensor(single, device=block_tables.device)
        out[rows] = paged_decode_attention(
            q[rows], k_cache, v_cache, block_tables[sel], context_lens[sel.to(context_lens.device)],
            scale, k_scale, v_scale, sliding_window, softcap, sinks=sinks,
            alibi_slopes=alibi_slopes)
    done = set(single) if len(single) > 1 else set()
    for b in range(len(ctx)):
        s, e = cu[b], cu[b + 1]
        if e == s or b in done:
            continue
        q_len, c = e - s, ctx[b]
        k = _gather_seq_kv(k_cache, block_tables[b], c, k_scale, q.dtype)
        v = _gather_seq_kv(v_cache, block_tables[b], c, v_scale, q.dtype)
        qb = q[s:e].transpose(0, 1)  # [Hq, q_len, D]
        k = k.transpose(0, 1).repeat_interleave(hq // hk, dim=0)  # [Hq, c, D]
        v = v.transpose(0, 1).repeat_interleave(hq // hk, dim=0)
        # query i may see keys j <= (c - q_len + i)
        qpos = torch.arange(c - q_len, c, device=q.device)[:, None]
        kpos = torch.arange(c, device=q.device)[None, :]
        mask = kpos <= qpos  # [q_len, c]
        if sliding_window > 0:
            mask &= kpos > qpos - sliding_window
        head_sinks = None if sinks is None else sinks.view(hq, 1, 1)
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, kpos, qpos)
        o = attend(qb.float(), k.float(), v.float(), mask, scale, softcap, bias, sinks=head_sinks)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           sliding_window: int = 0, softcap: float = 0.0,
                           sinks: torch.Tensor | None = None,
                           alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (the decode step), batched.

    q: [B, Hq, D]; caches as in ``paged_attention``; block_tables: [B, M];
    context_lens: [B] (including the token being decoded, whose position
    is context_len - 1; 0 yields zeros); ``sliding_window``, ``softcap``,
    ``sinks`` and ``alibi_slopes`` as in ``paged_attention``.
    Returns [B, Hq, D]. Vectorised: all sequences gathered to the longest
    context, masked, and attended in one fused SDPA call.
    """
    b, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    if b == 0:
        return q.new_empty((0, hq, d))
    max_ctx = int(context_lens.max().item())
    nblk = (max_ctx + bs - 1) // bs
    tables = block_tables[:, :nblk].reshape(-1).long()
    # gather every sequence's blocks: [B, S, Hk, D] -> [B, Hk, S, D]
    # (index_select on the flat table copies about twice as fast as k_cache[tables])
    k = k_cache.index_select(0, tables).reshape(b, nblk * bs, hk, d).transpose(1, 2)
    v = v_cache.index_select(0, tables).reshape(b, nblk * bs, hk, d).transpose(1, 2)
    if k_cache.dtype in FP8_DTYPES:
        k = k.to(torch.float32) * k_scale
        v = v.to(torch.float32) * v_scale
    k, v = k.to(q.dtype), v.to(q.dtype)
    pos = torch.arange(nblk * bs, device=q.device)[None, :]
    ctx = context_lens[:, None].to(q.device).long()
    valid = pos < ctx  # [B, S]
    if sliding_window > 0:
        valid &= pos >= ctx - sliding_window
    # one fused SDPA call; GQA by grouping query heads per kv head
    qg = q.view(b, hk, hq // hk, d)  # [B, Hk, G, D]
    group_sinks = None if sinks is None else sinks.view(1, hk, hq // hk, 1)
    bias = None
    if alibi_slopes is not None:  # [Hq, B, S] -> [B, Hk, G, S]
        bias = alibi_bias(alibi_slopes, pos, ctx - 1).view(hk, hq // hk, b, -1).permute(2, 0, 1, 3)
    out = attend(qg, k, v, valid[:, None, None, :], scale, softcap, bias, sinks=group_sinks)
    return out.reshape(b, hq, d)


def pack_kv(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layer_start: int,
    layer_end: int,
) -> torch.Tensor:
    """Gather a sequence's blocks for layers [layer_start, layer_end) into one
    contiguous buffer: [layer_end - layer_start, planes, n, BS, Hk, D]."""
    return kv_cache[layer_start:layer_end].index_select(2, block_ids.long()).contiguous()


def unpack_kv(
    buf: torch.Tensor,
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layer_start: int,
) -> None:
    """Scatter a buffer made by ``pack_kv`` into ``block_ids`` of ``kv_cache``
    starting at layer ``layer_start``, in place."""
    n_layers = buf.shape[0]
    dst = kv_cache[layer_start : layer_start + n_layers]
    src = buf.to(kv_cache.device, kv_cache.dtype)
    if kv_cache.dtype in FP8_DTYPES:  # no fp8 index_copy_ on CPU: copy the bytes
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(2, block_ids.long().to(kv_cache.device), src)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed experts of a mixture-of-experts MLP, summed per token.

    x: [T, H]; w_gate_up: [E, 2I, H], expert e's rows [gate | up];
    w_down: [E, H, I]; topk_weights: [T, K] float; topk_ids: [T, K] int, K
    distinct experts per token. Token t's output is
    ``sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
    e = topk_ids[t, j]: each expert's output rounded to x.dtype, the weighted
    sum in float32, the result in x.dtype: [T, H]. Experts run one at a time
    on the tokens routed to them; an expert no token chose costs nothing.
    """
    return routed_experts(
        x, topk_weights, topk_ids, w_gate_up.shape[0],
        lambda e, xs: F.linear(silu_and_mul(F.linear(xs, w_gate_up[e])), w_down[e]))


def routed_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   num_experts: int,
                   expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The weighted per-token sum of ``expert(e, x[rows])`` ([n, H] in
    x.dtype) over the experts each token chose: token-expert pairs grouped
    by expert, each expert run once on its rows, the sum in float32, the
    result in x.dtype: [T, H]. Shared by every reference MoE."""
    t, k = topk_ids.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token-expert pairs grouped by expert
    tokens = order // k
    weights = topk_weights.reshape(-1)[order].float()
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tokens[start:start + n]
        out.index_add_(0, rows, expert(e, x[rows]).float() * weights[start:start + n, None])
        start += n
    return out.to(x.dtype)
