"""LayerNorm in float32 without a bias: Cohere's CohereLayerNorm (a weight),
DBRX's LayerNorm (a weight) and OLMo's OlmoLayerNorm (no parameters at all).

Both transformers classes cast the row to float32, subtract its mean,
divide by the root of its (biased) variance plus eps, multiply the float32
weight in where there is one, and round the result once to the input
dtype: OLMo and DBRX through torch's layer norm, Cohere by its own
formula, which can differ from it by a float32 ulp (and so, after
rounding, by a bf16 one); each is computed here as its family computes it. ``FloatLayerNorm`` does the same with ``RMSNorm``'s interface (the
residual add fused in). A torch op on every device: the kernel registry
has no LayerNorm kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FloatLayerNorm(nn.Module):
    """Normalises the last dim of its input. ``shape``: the weight's shape
    (``(hidden,)``, or Cohere's per-head q/k norms' ``(heads, head_dim)``,
    which the input's trailing dims broadcast against); ``weight=False``:
    no weight (OLMo); ``cohere``: CohereLayerNorm's formula. ``bias`` is
    always None (``norm_slots`` reads it)."""

    def __init__(self, shape: tuple[int, ...], eps: float, dtype: torch.dtype,
                 device: torch.device | str, weight: bool = True, cohere: bool = False):
        super().__init__()
        self.eps = eps
        self.cohere = cohere
        self.weight = (nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
                       if weight else None)
        self.bias = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [..., dim]; with residual returns (norm(x + residual), x + residual)
        if residual is not None:
            x = x + residual
        if self.cohere:
            xf = x.float()
            centred = xf - xf.mean(-1, keepdim=True)
            normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.weight is not None:
            normed = self.weight.float() * normed
        return normed.to(x.dtype), (x if residual is not None else None)
