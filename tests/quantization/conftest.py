"""Shared small models and data for the quantization tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    from quant_helpers import backend_missing

    ours = [item for item in items if _HERE in Path(str(item.fspath)).parents]
    # Cases parametrized over an optional backend that is not installed are skipped, with the reason.
    for item in ours:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for key in ("backend_name", "backend"):
            if isinstance(params.get(key), str) and (reason := backend_missing(params[key])):
                item.add_marker(pytest.mark.skip(reason=reason))
    # Slow cases (torch.compile) are deselected by `make test` (-m "not slow") and run by `make test-slow`.


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits as (train_x, train_y, test_x, test_y) float tensors in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="session")
def trained_mlp(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return _train(model, digits[0], digits[1])


@pytest.fixture(scope="session")
def trained_cnn(digits):
    torch.manual_seed(0)
    return _train(SmallCNN(), digits[0].view(-1, 1, 8, 8), digits[1], steps=80)


def accuracy_fn(x: torch.Tensor, y: torch.Tensor):
    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    return evaluate


def make_sensitive_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP whose first layer ("0") breaks under int8: its input has one huge, useless feature.

    Feature 0 is ~1000 and its weights are 0, so fp32 ignores it, but a per-tensor int8 scale
    for that input (static or dynamic) rounds every informative feature to a few levels.
    Returns (model, inputs, fp32 predictions as labels).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    x = torch.randn(512, 16) * 0.5
    x[:, 0] = 1000.0 + torch.rand(512)
    with torch.no_grad():
        labels = model(x).argmax(1)
    return model, x, labels
