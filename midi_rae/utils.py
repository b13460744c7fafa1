"""Small helpers used across the package."""
from torch import nn


def param_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters of `model`."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
