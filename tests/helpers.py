"""Plain helpers shared by test modules (``from helpers import ...``; pytest puts this folder on the path)."""

import torch

F64 = torch.float64


def random_labels(loss: str, shape: tuple[int, ...], g: torch.Generator, classes: int = 3) -> torch.Tensor:
    """Labels that fit ``loss``: standard normal (squared), 0/1 (logistic) or ``0 .. classes - 1`` (multiclass)."""
    if loss == "squared":
        return torch.randn(*shape, generator=g, dtype=F64)
    if loss == "logistic":
        return (torch.rand(*shape, generator=g, dtype=F64) < 0.5).to(F64)
    return torch.randint(0, classes, shape, generator=g).to(F64)
