"""Training signals as pure functions of predictions, targets and masks."""
import torch
from torch import Tensor


def safe_mean(x: Tensor) -> Tensor:
    """Mean of `x`, or 0 (not NaN) when `x` is empty, e.g. a selection of masked positions
    in a batch where nothing was masked. Keeps the graph, so gradients stay defined."""
    if x.numel() == 0:
        return x.sum()  # 0.0, connected to x's graph
    return x.mean()
