"""The draft-model proposer: a small checkpoint with the target's
vocabulary drafts greedily, in the same engine, with its own paged KV.

Each sequence has a mirror here (a ``Sequence`` over the same tokens)
whose KV lives in the draft's own block pool (``KVCacheManager`` without
prefix caching) and runs through its own ``ModelRunner``. Per propose:

  1. sync: the target's tokens since the last proposal are compared with
     the drafts fed then; KV stands for the matching ones, the rest is
     rolled back (``KVCacheManager.trim``);
  2. catch up: one varlen forward over every mirror's tokens without KV
     (a new sequence's whole prompt: the draft prefills it here) gives
     draft token 0, the argmax;
  3. k - 1 decode steps feed each draft token and take the next argmax.

A sequence that arrives by a KV hand-off, or resumes on another replica,
has no mirror: step 2 prefills the draft from its tokens on this replica.
The draft's KV is small (a draft is a fraction of the target) and
recomputing it costs one draft prefill, so the hand-off never carries it,
and prefill replicas need no draft at all. The draft's pool has as many
blocks as the target's unless ``draft_num_blocks`` says otherwise; a
sequence the pool cannot hold gets no drafts (it decodes plainly) and the
catch-up of one step is bounded by the target's token budget (a longer
prompt is prefilled over several steps, without drafts meanwhile).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from splitserve.engine.errors import CheckpointError
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.config import SpeculativeConfig
from splitserve.engine.spec.proposer import Proposer, ProposerContext, register_proposer
from splitserve.engine.tokenizer import Tokenizer

_PARAMS = SamplingParams()
# tokens a mirror computes in the catch-up of a step that follows a drafted
# one: the correction token, or the last draft and the bonus token when all
# were accepted. More means the catch-up prefills (a new sequence, or steps
# without drafts): work done once, not per draft position.
STEADY_CATCH_UP = 2


def check_compatible(path: Path, draft_vocab: int, ctx: ProposerContext) -> None:
    """Raise CheckpointError unless the draft at ``path`` shares the
    target's tokenizer (token -> id, added tokens included) and covers its
    vocabulary."""
    if (path / "tokenizer.json").is_file():
        draft_tok = Tokenizer.from_dir(path)
        if draft_tok.backend.get_vocab(with_added_tokens=True) != \
                ctx.tokenizer.backend.get_vocab(with_added_tokens=True):
            raise CheckpointError(f"draft model {path}: its tokenizer differs from the target's; "
                                  "a draft must share the target's vocabulary")
    if draft_vocab < ctx.tokenizer.vocab_size:
        raise CheckpointError(f"draft model {path}: vocabulary of {draft_vocab} tokens is "
                              f"smaller than the target tokenizer's {ctx.tokenizer.vocab_size}")


class DraftModelProposer(Proposer):
    def __init__(self, cfg: SpeculativeConfig, ctx: ProposerContext):
        path = Path(cfg.draft_model).expanduser()
        ckpt = load_checkpoint(path)
        check_compatible(path, ckpt.model_config.vocab_size, ctx)
        if ckpt.model_config.options.hybrid is not None:
            raise CheckpointError(f"draft model {path}: a hybrid model ({ckpt.model_config.architecture}) "
                                  "cannot draft here; use an attention-only draft or n-gram")
        ecfg = ctx.engine_cfg
        self.block_size = ecfg.block_size
        num_blocks = cfg.draft_num_blocks or ctx.num_blocks
        # the draft serves no LoRA adapters: it drafts from the base model
        # for every sequence, adapters included (the target verifies with them)
        dcfg = dataclasses.replace(ecfg, model=str(path), num_blocks=num_blocks,
                                   enable_prefix_caching=False, weight_dtype="auto",
                                   speculative=None, max_loras=0, max_cpu_loras=None,
                                   tensor_parallel_size=1)  # unsplit, beside rank 0
        model = load_model(ckpt, ctx.dtype, ctx.device)
        self.model_cfg = ckpt.model_config
        self.runner = ModelRunner(model, ckpt.model_config, dcfg, ctx.dtype, ctx.device, num_blocks)
        self.kv = KVCacheManager(num_blocks, self.block_size, enable_prefix_caching=False)
        self.max_len = ckpt.model_config.max_position
        self.vocab = ctx.model_cfg.vocab_size  # drafts past the target's logits are cut
        self.budget = ecfg.max_num_batched_tokens
        self.mirrors: dict[str, Sequence] = {}
        self._base: dict[str, int] = {}  # the target's length at the last proposal

    def release(self, seq_id: str) -> None:
        self.mirrors.pop(seq_id, None)
        self._base.pop(seq_id, None)
        self.kv.free(seq_id)

    def all_free(self) -> bool:
        return not self.mirrors and self.kv.all_free()

    def _sync(self, seq: Sequence, budget: int) -> tuple[Sequence, int] | None:
        """The mirror of ``seq`` with KV for the tokens both agree on, and
        the tokens to compute now (at most ``budget``); None without room."""
        target = seq.token_ids
        m = self.mirrors.get(seq.seq_id)
        if m is None:
            m = Sequence(seq.seq_id, target, _PARAMS, self.block_size)
            n = self.kv.allocate_prompt(m, budget)
            if n == 0:
                return None
            self.mirrors[seq.seq_id] = m
            return m, n
        base, c = self._base[seq.seq_id], m.num_computed_tokens
        keep = min(c, base)
        while keep < min(c, len(target)) and m.token_ids[keep] == target[keep]:
            keep += 1  # a draft fed last time that the target accepted
        keep = min(keep, len(target) - 1)  # the last token always runs, for its logits
        del m.token_ids[keep:]
        m.token_ids.extend(target[keep:])
        m.num_computed_tokens = keep
        self.kv.trim(seq.seq_id, keep)
        n = min(len(target) - keep, budget)
        if not self.kv.allocate_more(m, n):
            return None
        return m, n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seqs]
        self.one_off_s = 0.0
        budget = self.budget
        sched: list[ScheduledSeq] = []
        owners: list[int] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            if budget <= 0 or seq.num_tokens + k - 1 > self.max_len:
                continue
            got = self._sync(seq, budget)
            if got is None:
                continue
            self._base[seq.seq_id] = seq.num_tokens
            sched.append(ScheduledSeq(*got))
            owners.append(i)
            budget -= got[1]
        if not sched:
            return out
        # catch-up: every mirror's tokens without KV; the completed ones draft token 0
        t0 = time.perf_counter()
        logits, rows, _ = self.runner.execute(sched, self.kv)
        first = logits.argmax(dim=-1).tolist()  # [B]; waits for the forward
        if max(s.num_new_tokens for s in sched) > STEADY_CATCH_UP:
            self.one_off_s = time.perf_counter() - t0
        for s in sched:
            s.seq.num_computed_tokens += s.num_new_tokens
        active: list[tuple[int, Sequence]] = []
        for tok, r in zip(first, rows):
            i = owners[r]
            out[i].append(tok)
            active.append((i, sched[r].seq))
        for j in range(1, max(num_tokens)):
            active = [(i, m) for i, m in active
                      if num_tokens[i] > j and out[i][-1] < self.vocab
                      and self.kv.allocate_more(m, 1)]
            if not active:
                break
            for i, m in active:
                m.append_token(out[i][-1])
            step = [ScheduledSeq(m, 1) for _, m in active]
            logits, rows, _ = self.runner.execute(step, self.kv)
            for s in step:
                s.seq.num_computed_tokens += 1
            for tok, r in zip(logits.argmax(dim=-1).tolist(), rows):
                out[active[r][0]].append(tok)
        for d in out:  # a token past the target's vocabulary ends the drafts
            cut = next((p for p, t in enumerate(d) if t >= self.vocab), len(d))
            del d[cut:]
        return out


@register_proposer("draft")
def _make(cfg: SpeculativeConfig, ctx: ProposerContext) -> Proposer:
    return DraftModelProposer(cfg, ctx)
