"""Model factories for the evaluation command's tests (``--model tests.eval.models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers_mnist import SmallCnn


def tiny_net(classes: int = 10, seed: int = 0) -> nn.Module:
    """A small random-init CNN on RGB pixels in [0, 1], any input size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(32, classes))


class FirstChannel(nn.Module):
    """MNIST decoded as RGB (three equal channels) into the 1-channel SmallCnn: keeps channel 0, exactly."""

    def __init__(self):
        super().__init__()
        self.net = SmallCnn()

    def forward(self, x):
        return self.net(x[:, :1])


def mnist_net() -> nn.Module:
    return FirstChannel()
