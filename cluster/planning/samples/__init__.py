"""Small generated traces in each format the simulator reads, for tests and
first runs (not downloaded: ``python -m splitserve.cluster.planning.samples``
writes them again, identically).

- ``mooncake_sample.jsonl``: 120 requests over ~60 s, Mooncake format, with
  three shared system prompts and multi-turn conversations that extend
  their own earlier prompts (the prefix structure hash_ids describe).
- ``azure_sample.csv``: 120 requests over ~60 s, Azure LLM inference trace
  format (TIMESTAMP, ContextTokens, GeneratedTokens).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
MOONCAKE = HERE / "mooncake_sample.jsonl"
AZURE = HERE / "azure_sample.csv"


def mooncake_lines(n: int = 120, seed: int = 17) -> list[str]:
    rng = np.random.default_rng(seed)
    t = 0.0
    lines = []
    next_id = 1000
    conversations: list[list[int]] = []  # hash ids of each conversation's last prompt
    for _ in range(n):
        t += float(rng.exponential(500.0))  # ms: ~2 req/s
        if conversations and rng.random() < 0.35:  # a follow-up turn: its prompt extends one
            conv = conversations[int(rng.integers(len(conversations)))]
            extra = int(rng.integers(1, 3))
            ids = conv + list(range(next_id, next_id + extra))
            next_id += extra
            conv[:] = ids
        else:
            system = int(rng.integers(3))  # one of three shared system prompts (2 blocks each)
            extra = int(rng.integers(0, 4))
            ids = [system * 10, system * 10 + 1] + list(range(next_id, next_id + extra))
            next_id += extra
            conversations.append(list(ids))
        n_in = 512 * (len(ids) - 1) + int(rng.integers(1, 513))
        n_out = int(rng.integers(16, 400))
        lines.append(f'{{"timestamp": {int(t)}, "input_length": {n_in}, '
                     f'"output_length": {n_out}, "hash_ids": {ids}}}')
    return lines


def azure_lines(n: int = 120, seed: int = 23) -> list[str]:
    rng = np.random.default_rng(seed)
    t = datetime(2023, 11, 16, 18, 15, 46)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for _ in range(n):
        t += timedelta(microseconds=int(rng.exponential(0.5) * 1e6))
        ctx = int(np.clip(rng.lognormal(6.5, 0.9), 8, 8000))
        gen = int(np.clip(rng.lognormal(4.5, 0.8), 1, 1500))
        stamp = t.strftime("%Y-%m-%d %H:%M:%S.%f") + "0"  # 7 fractional digits, as published
        lines.append(f"{stamp},{ctx},{gen}")
    return lines


def write() -> None:
    MOONCAKE.write_text("\n".join(mooncake_lines()) + "\n")
    AZURE.write_text("\n".join(azure_lines()) + "\n")
