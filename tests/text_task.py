"""A Hugging Face style text task for end-to-end tests: dict batches (``input_ids``, ``attention_mask``, ``labels``),
a LightningModule whose steps call ``self(input_ids=..., attention_mask=...)`` by keyword.

The label says whether token 1 occurs more often than token 2 among the unmasked tokens; a bag of embeddings learns
it in an epoch or two.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, Dataset

VOCAB, LENGTH = 20, 12


class TokenDicts(Dataset):
    def __init__(self, count: int, seed: int, keys: tuple[str, str, str]) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)
        self.mask = (torch.arange(LENGTH) < torch.randint(4, LENGTH + 1, (count, 1), generator=generator)).long()
        kept = self.ids * self.mask + VOCAB * (1 - self.mask)  # masked tokens count for neither
        self.labels = ((kept == 1).sum(1) > (kept == 2).sum(1)).long()
        self.keys = keys

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, (self.ids[i], self.mask[i], self.labels[i])))


class TextData(L.LightningDataModule):
    """`keys` names the batch's (ids, mask, labels) entries: forward's parameter names by default."""

    def __init__(self, keys: tuple[str, str, str] = ("input_ids", "attention_mask", "labels"),
                 batch_size: int = 32) -> None:
        super().__init__()
        self.keys, self.batch_size = tuple(keys), batch_size

    def _loader(self, count: int, seed: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(TokenDicts(count, seed, self.keys), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(1024, 0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(256, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(256, 2)


class TextClassifier(L.LightningModule):
    def __init__(self, keys: tuple[str, str, str] = ("input_ids", "attention_mask", "labels")) -> None:
        super().__init__()
        self.keys = tuple(keys)
        self.embedding = nn.Embedding(VOCAB, 32)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.ff(self.embedding(input_ids)) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, labels = (batch[k] for k in self.keys)
        logits = self(input_ids=ids, attention_mask=mask)  # by keyword, as Hugging Face code calls models
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def training_step(self, batch, batch_idx):
        return self._step(batch)[0]

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", self._step(batch)[1])

    def test_step(self, batch, batch_idx):
        self.log("test_acc", self._step(batch)[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class BatchClassifier(TextClassifier):
    """The same model with ``forward(self, batch)``: it reads the token ids and the mask from the batch itself."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ids, mask = (batch[k] for k in self.keys[:2])
        return super().forward(ids, mask)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self(batch), batch[self.keys[2]]
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


class PackedLSTMClassifier(TextClassifier):
    """The task read by a bidirectional LSTM over the unmasked tokens only: packed by their lengths (the mask's
    sums; unmasked tokens come first), the last forward and backward states joined."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        del self.ff
        self.lstm = nn.LSTM(32, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embedding(input_ids), attention_mask.sum(1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        h = self.lstm(packed)[1][0]
        return self.head(torch.cat((h[-2], h[-1]), dim=1))
