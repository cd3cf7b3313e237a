"""Loading and unloading LoRA adapters at run time, in vLLM's shapes.

  POST /v1/load_lora_adapter    {"lora_name", "lora_path", "base_model"?, "load_inplace"?}
  POST /v1/unload_lora_adapter  {"lora_name", "lora_int_id"?}

Behind the API key like every route. A loaded adapter is served at once
as a model (``model: <lora_name>``) and listed by /v1/models with its base
model as ``parent``. Errors in OpenAI's shape: 400 (unreadable files, an
unserved PEFT feature named in ``param``, a rank or shape that does not fit
the base model, no base model to put it on), 404 (unloading a name not
loaded), 409 (the name is taken; ``load_inplace: true`` replaces an
adapter of that name instead). Unloading lets running requests finish.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import Field

from splitserve.cluster.api.backend import Backend
from splitserve.cluster.api.http_body import read_request
from splitserve.cluster.api.openai_schema import RequestBody

MAX_ADAPTER_BODY_BYTES = 1 << 16


class LoadLoraAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model: str | None = None  # splitserve: which served model it runs on
    load_inplace: bool = False  # replace an adapter already loaded under lora_name


class UnloadLoraAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; names are what identify adapters here


def add_adapter_routes(app: FastAPI, backend: Backend, model_card) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> dict:
        body: LoadLoraAdapterRequest = await read_request(
            request, LoadLoraAdapterRequest, MAX_ADAPTER_BODY_BYTES)
        info = await backend.load_adapter(body.lora_name, body.lora_path, body.base_model,
                                          replace=body.load_inplace)
        return model_card(info)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> dict:
        body: UnloadLoraAdapterRequest = await read_request(
            request, UnloadLoraAdapterRequest, MAX_ADAPTER_BODY_BYTES)
        await backend.unload_adapter(body.lora_name)
        return {"id": body.lora_name, "object": "model", "deleted": True}
