"""An ordinary Lightning project: a digit classifier on scikit-learn's bundled 8x8 digits.

    python examples/digits/classifier.py

``few_shot.py`` beside it turns this project into few-shot learning with a handful of lines.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Digits(Dataset):
    """scikit-learn's digits (1,797 images of 8x8 pixels, 10 classes) of the given classes:
    ``(pixels / 16 as 64 floats, label)``."""

    def __init__(self, classes: list[int]) -> None:
        digits = load_digits()
        keep = [i for i, label in enumerate(digits.target) if label in classes]
        self.x = torch.tensor(digits.data[keep], dtype=torch.float32) / 16
        self.targets = [int(digits.target[i]) for i in keep]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], self.targets[index]


class DigitsDataModule(pl.LightningDataModule):
    """Train, validation and test datasets of the given classes (a seeded 70/15/15 split of
    their images)."""

    def __init__(self, classes: tuple[int, ...] = tuple(range(10)), batch_size: int = 64) -> None:
        super().__init__()
        self.classes, self.batch_size = list(classes), batch_size

    def setup(self, stage: str | None = None) -> None:
        data = Digits(self.classes)
        n = len(data)
        parts = [int(0.7 * n), int(0.15 * n)]
        parts.append(n - sum(parts))
        generator = torch.Generator().manual_seed(0)
        self.train_set, self.val_set, self.test_set = torch.utils.data.random_split(
            data, parts, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


def make_net(n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, n_classes)
    )


class Classifier(pl.LightningModule):
    def __init__(self, n_classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


if __name__ == "__main__":
    trainer = pl.Trainer(max_epochs=20, logger=False, enable_checkpointing=False)
    model = Classifier()
    data = DigitsDataModule()
    trainer.fit(model, data)
    trainer.test(model, data)
