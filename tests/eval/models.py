"""Model factories for the evaluation command's tests (``--model tests.eval.models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers_mnist import SmallCnn


def tiny_net(classes: int = 10, seed: int = 0) -> nn.Module:
    """A small random-init CNN on RGB pixels in [0, 1], any input size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)
        )


class FirstChannel(nn.Module):
    """MNIST decoded as RGB (three equal channels) into the 1-channel SmallCnn: keeps channel 0, exactly."""

    def __init__(self):
        super().__init__()
        self.net = SmallCnn()

    def forward(self, x):
        return self.net(x[:, :1])


def mnist_net() -> nn.Module:
    return FirstChannel()


class MnistTiny(nn.Module):
    """Two stride-2 convolutions and a linear head (~9k parameters) on channel 0 of RGB-decoded MNIST in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 10),
        )

    def forward(self, x):
        return self.net((x[:, :1] - 0.1307) / 0.3081)  # normalization inside the model


def mnist_tiny() -> nn.Module:
    return MnistTiny()


def train_mnist_tiny(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 2, seed: int = 0) -> nn.Module:
    """A few seconds of Adam on ``(N, 1, 28, 28)`` uint8 images; returns the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MnistTiny()
    x = images.float().div(255)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
