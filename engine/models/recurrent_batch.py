"""Recurrent layers (Gated DeltaNet, Kimi Delta Attention) over the engine's
flat batch: their causal depthwise convolutions, each sequence's last K - 1
inputs kept as its "conv" state in the recurrent-state store, and their
delta rules, each sequence from its slot. Decoding steps (one token per
sequence) run batched; prompt chunks run one sequence at a time; a verify
chunk (``AttentionMetadata.keep_states``) runs token by token and returns
every token's states for a speculative rollback (``RecurrentState.keep``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


Activation = Callable[[torch.Tensor], torch.Tensor] | None


def _taps(window: torch.Tensor, weight: torch.Tensor, n: int, bias: torch.Tensor | None,
          activation: Activation) -> torch.Tensor:
    """The last ``n`` outputs of a depthwise convolution over ``window`` [..., C,
    K - 1 + n]: tap by tap in float32 (plus ``bias`` [C]), rounded once to
    the window's dtype as conv1d rounds, then ``activation``. (A small
    depthwise ``F.conv1d`` costs milliseconds a call on the CPU.)"""
    taps, w = window.float(), weight.float()
    out = taps[..., :n] * w[:, :1]
    for k in range(1, w.shape[1]):
        out = out + taps[..., k:k + n] * w[:, k:k + 1]
    if bias is not None:
        out = out + bias.float()[:, None]
    out = out.to(window.dtype)
    return out if activation is None else activation(out)


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, activation: Activation = F.silu,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's chunk x [n, C] through the depthwise causal convolution
    ``weight`` [C, K] (plus ``bias`` [C]) after its last K - 1 inputs
    ``state`` [C, K - 1]: (``activation`` of the output [n, C] (None: none),
    the new state)."""
    window = torch.cat([state, x.t().to(state.dtype)], dim=1)  # [C, K - 1 + n]
    out = _taps(window, weight, x.shape[0], bias, activation)
    return out.t(), window[:, window.shape[1] - state.shape[1]:]


def conv_sequences(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                   lens: tuple[int, ...], slots: torch.Tensor, keep: tuple[bool, ...] | None = None,
                   activation: Activation = F.silu, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The flat batch x [T, C] through each sequence's ``causal_conv``, reading
    and updating its slot of ``conv_state`` [slots, C, K - 1]. Returns (the
    output [T, C] in x's dtype, slot -> the state after each token [n, C,
    K - 1] of the sequences ``keep`` marks)."""
    if all(n == 1 for n in lens):  # decoding: every sequence one token, batched
        window = torch.cat([conv_state.index_select(0, slots), x[:, :, None].to(conv_state.dtype)], dim=2)
        out = _taps(window, weight, 1, bias, activation)[..., 0]
        conv_state.index_copy_(0, slots, window[:, :, 1:])
        return out.to(x.dtype), {}
    keep = keep or (False,) * len(lens)
    out = torch.empty_like(x)
    kept: dict[int, torch.Tensor] = {}
    start = 0
    for i, n in enumerate(lens):
        slot = int(slots[i])
        chunk = x[start:start + n]
        if keep[i]:  # the last K - 1 inputs after each token of the chunk
            window = torch.cat([conv_state[slot], chunk.t().to(conv_state.dtype)], dim=1)
            k1 = conv_state.shape[2]
            kept[slot] = torch.stack([window[:, t + 1:t + 1 + k1] for t in range(n)])
        mixed, conv_state[slot] = causal_conv(chunk, conv_state[slot], weight, activation, bias)
        out[start:start + n] = mixed.to(x.dtype)
        start += n
    return out, kept


Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def kept_steps(step: Step, state: torch.Tensor, *inputs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's verify chunk token by token through ``step(*token
    inputs, state)`` (a batched one-token rule such as
    ``delta_rule.recurrent_step``), from ``state`` [*shape]. Returns (the
    outputs [n, ...], the last state, every token's state [n, *shape])."""
    outs, states = [], []
    s = state[None]
    for t in range(inputs[0].shape[0]):
        o, s = step(*(x[t:t + 1] for x in inputs), s)
        outs.append(o)
        states.append(s[0])
    return torch.cat(outs), s[0], torch.stack(states)


def rule_sequences(step: Step, chunked: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                   state: torch.Tensor, lens: tuple[int, ...], slots: torch.Tensor,
                   keep: tuple[bool, ...] | None, *inputs: torch.Tensor,
                   decode: Callable[..., torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A recurrent rule over the flat batch (``inputs``: per-token rows, such
    as q, k, v, g, beta), each sequence from its slot of ``state`` [slots,
    *shape], which is updated: ``step(*inputs, state)`` for a batch of single
    tokens (``decode(*inputs, state, slots)`` instead where given: the same
    step in place on the slots, such as ``ops.gated_delta_step``),
    ``chunked(*inputs, state)`` for one sequence's chunk. Returns (the
    outputs [T, ...], slot -> every token's state [n, *shape] of the
    sequences ``keep`` marks)."""
    if all(n == 1 for n in lens) and decode is not None:
        return decode(*inputs, state, slots), {}
    if all(n == 1 for n in lens):
        out, new = step(*inputs, state.index_select(0, slots))
        state.index_copy_(0, slots, new)
        return out, {}
    keep = keep or (False,) * len(lens)
    outs: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}
    start = 0
    for i, n in enumerate(lens):
        slot = int(slots[i])
        rows = [x[start:start + n] for x in inputs]
        if keep[i]:
            o, new, kept[slot] = kept_steps(step, state[slot], *rows)
        elif n == 1:
            o, new = step(*rows, state[slot:slot + 1])
            new = new[0]
        else:
            o, new = chunked(*rows, state[slot])
        outs.append(o)
        state[slot] = new
        start += n
    return torch.cat(outs), kept
