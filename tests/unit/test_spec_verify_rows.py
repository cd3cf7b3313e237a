"""A verify step's attention as decode rows (``model_runner.verify_rows_as_decode``,
the CPU's form) gives the logits the chunked form gives, with sliding
windows, with ALiBi (each row biased from its own position), across block
boundaries and beside a sequence without drafts."""

import pytest
import torch

from splitserve.engine import model_runner
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSeq


def verify_logits(path, as_decode: bool, monkeypatch) -> tuple[torch.Tensor, bool]:
    """Prefill two prompts, then run one verify step by hand: sequence 0
    with 5 draft tokens (crossing a block), sequence 1 with none: 7 tokens,
    within ``VERIFY_AS_DECODE_MAX_TOKENS``."""
    eng = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=4,
                                 enable_prefix_caching=False))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for n in (14, 9):  # contexts longer than the 8-token windows of the *_window models
        eng.add_request(None, prompt_token_ids=[(7 * i + n) % 50 + 3 for i in range(n)], params=sp)
    eng.step()  # both prompts prefilled, one token sampled each
    seqs = [st.seq for st in eng.requests.values()]
    drafts = [[11, 12, 13, 14, 15], []]
    scheduled = []
    for seq, d in zip(seqs, drafts):
        assert eng.kv.allocate_more(seq, 1 + len(d))
        scheduled.append(ScheduledSeq(seq, 1 + len(d), d))
    monkeypatch.setattr(model_runner, "VERIFY_AS_DECODE_DEVICES", ("cpu",) if as_decode else ())
    inp = eng.runner.prepare(scheduled, eng.kv)
    logits, rows, _ = eng.runner.execute(scheduled, eng.kv)
    assert rows == [0] * 6 + [1]
    return logits, inp.meta.decode_only


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen2_window", "falcon_alibi"])
def test_decode_rows_match_chunked_verify(tiny_checkpoints, variant, monkeypatch):
    path = tiny_checkpoints[variant]
    chunked, chunked_decode_only = verify_logits(path, False, monkeypatch)
    rows, rows_decode_only = verify_logits(path, True, monkeypatch)
    assert not chunked_decode_only and rows_decode_only  # the two forms did run
    torch.testing.assert_close(rows, chunked, rtol=1e-5, atol=1e-5)


def test_long_verify_steps_keep_the_chunked_form(tiny_llama, monkeypatch):
    monkeypatch.setattr(model_runner, "VERIFY_AS_DECODE_MAX_TOKENS", 6)
    _, decode_only = verify_logits(tiny_llama, True, monkeypatch)
    assert not decode_only  # 7 tokens: past the limit


def test_decode_rows_metadata():
    class Seq:
        pass

    a, b = ScheduledSeq(Seq(), 3, [5, 6]), ScheduledSeq(Seq(), 1, [])
    cu, ctx, tables = model_runner.verify_rows_as_decode([a, b], [10, 4], [[1, 2, 3], [4]])
    assert cu == [0, 1, 2, 3, 4]
    assert ctx == [8, 9, 10, 4]  # each draft row sees itself and the rows before it
    assert tables == [[1, 2, 3]] * 3 + [[4]]
