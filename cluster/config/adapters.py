"""The ``models[].model.adapters`` entries: LoRA adapters served on a model."""

from __future__ import annotations

from pydantic import Field

from .base import _Strict


class AdapterSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=256, description="Model name clients ask "
                      "for to run this adapter (``model`` of a request; listed by /v1/models "
                      "with its base model as ``parent``).")
    path: str = Field(..., min_length=1, description="PEFT adapter folder (adapter_config.json "
                      "+ adapter_model.safetensors), readable at this path on the ingress node "
                      "and on every node running the model's pools (each replica reads it when "
                      "a request first needs it).")
