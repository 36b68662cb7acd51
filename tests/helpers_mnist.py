"""A small MNIST CNN trained inside the tests (cached per session), on ../shared/datasets/mnist."""

from __future__ import annotations

import functools

import torch
from torch import nn

from advtrain.data import load_image_set


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net((x - 0.1307) / 0.3081)  # normalization inside the model


@functools.lru_cache(maxsize=1)
def trained_mnist_cnn(root: str, *, n_train: int = 10000, epochs: int = 2, seed: int = 0):
    """Trains SmallCnn for a few seconds; returns (model in eval mode, test images, test labels)."""
    torch.manual_seed(seed)
    train = load_image_set(root, "train", limit=n_train)
    test = load_image_set(root, "test", limit=1000)
    x, y = train.images.float() / 255, train.labels
    model = SmallCnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), test.images.float() / 255, test.labels
