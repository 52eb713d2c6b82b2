"""A small sequence task for end-to-end tests: token sequences of three lengths, in batches of one length each.

The label says whether token 1 occurs more often than token 2; an LSTM learns it in an epoch or two.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

LENGTHS = (8, 16, 24)
VOCAB = 20


def token_batches(count: int, seed: int, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        tokens = torch.randint(0, VOCAB, (batch_size, LENGTHS[i % len(LENGTHS)]), generator=generator)
        batches.append((tokens, ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()))
    return batches


class TokenData(L.LightningDataModule):
    """Pre-batched token sequences (each batch one length), as a bucketing sampler yields them."""

    def __init__(self, train_batches: int = 45) -> None:
        super().__init__()
        self.train_batches = train_batches

    def setup(self, stage: str | None = None) -> None:
        self.train = token_batches(self.train_batches, seed=0)
        self.val, self.test = token_batches(9, seed=1), token_batches(9, seed=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=None, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=None)


class TokenClassifier(L.LightningModule):
    """Embedding -> LSTM -> last state -> MLP head."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.rnn(self.embed(tokens))[0][:, -1])))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx: int) -> None:
        self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)
