"""Keep a model that a module uses but does not train out of that module's parameters."""

from __future__ import annotations

from torch import nn


def attach_frozen(owner: nn.Module, name: str, model):
    """Set `owner.<name> = model` without registering it as a submodule, and stop gradients into its weights
    (not into its inputs: reward and value gradients in x still flow). `owner.parameters()` and
    `owner.state_dict()` then hold only what `owner` trains. Returns the model."""
    if isinstance(model, nn.Module):
        model.requires_grad_(False)
    object.__setattr__(owner, name, model)
    return model
