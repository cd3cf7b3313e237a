"""A Ray worker setup hook for fault-injection tests (never used outside
tests): in every worker process of the test cluster, a sequence whose
prompt starts with ``POISON`` feeds the model a token id past the
vocabulary once it has two outputs, so the embedding really raises
(IndexError on CPU) on whichever replica runs it."""

from __future__ import annotations

POISON = [77, 78, 79]
HOOK = "tests.integration.poison_hook.install"


def install() -> None:
    from splitserve.engine.model_runner import ModelRunner

    if getattr(ModelRunner.execute, "poisoned", False):
        return
    execute = ModelRunner.execute

    def execute_poisoned(self, scheduled, kv, on_layer_done=None):
        for s in scheduled:
            seq = s.seq
            if seq.token_ids[:len(POISON)] == POISON and seq.num_output_tokens >= 2:
                seq.token_ids[-1] = self.model_cfg.vocab_size + 5
        return execute(self, scheduled, kv, on_layer_done)

    execute_poisoned.poisoned = True
    ModelRunner.execute = execute_poisoned
