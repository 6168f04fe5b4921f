"""Exponential moving average of a model's weights (the usual companion of DDPM training)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _tracked(model: nn.Module) -> dict[str, Tensor]:
    # Parameters and floating-point buffers; integer buffers (e.g. BatchNorm's counter) are not averaged.
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return tensors


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight, for every parameter and floating buffer.

    The shadow copy is kept in float32 on the model's device (whatever the model's dtype).

    Args:
        model: the model whose weights are tracked; the shadow starts as a copy of them.
        decay: in [0, 1]; 0 makes the shadow follow the model exactly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                n: t.detach().to(dtype=torch.float32, copy=True) for n, t in _tracked(model).items()
            }

    def _check(self, tensors: dict[str, Tensor]) -> None:
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())
            extra = sorted(tensors.keys() - self.shadow.keys())
            raise ValueError(f"model does not match the EMA: missing {missing[:5]}, unexpected {extra[:5]}")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current weights."""
        tensors = _tracked(model)
        self._check(tensors)
        weight = 1.0 - self.decay
        for name, tensor in tensors.items():
            # lerp: s + w (x - s) = decay * s + (1 - decay) * x
            self.shadow[name].lerp_(tensor.detach().to(self.shadow[name].device, torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the shadow (cast to the model's dtype)."""
        tensors = _tracked(model)
        self._check(tensors)
        for name, tensor in tensors.items():
            tensor.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the tracked names must match, tensors move to the shadow's device."""
        shadow = state_dict["shadow"]
        self._check(shadow)
        self.decay = float(state_dict["decay"])
        self.num_updates = int(state_dict["num_updates"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value.to(torch.float32))
