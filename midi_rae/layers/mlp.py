"""Feed-forward block and stochastic depth."""
from typing import Callable

from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> linear -> dropout (names match timm's `Mlp`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `drop_prob`
    (https://arxiv.org/abs/1603.09382), scaling kept branches by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
