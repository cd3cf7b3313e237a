"""LoRA adapters on a served base model, in PEFT's format.

- ``adapter``: who an adapter is (``AdapterRef``: name, path, content
  digest), its errors, and reading ``adapter_config.json`` (what PEFT
  features are served, per-module rank and scaling).
- ``layout``: the adapter's tensors checked against the base model
  (which projections, ranks, shapes), from the safetensors header alone.
- ``weights``: the tensors loaded, scaling folded into B.
- ``slots``: the fixed device slots, least-recently-used eviction of
  adapters no running sequence uses (plain Python).
- ``manager``: the engine's adapters: the host cache, the slots, and the
  copies into the model's LoRA stacks (``splitserve.engine.models.lora_layers``).
- ``registry``: the adapters one engine serves by name, resolved for its
  requests (``LLMEngine.add_adapter``, ``resolve_adapter``).
"""
