"""The project of ``classifier.py``, few-shot: meta-train on digits 0-6, adapt to digits 7-9
from K examples each.

    python examples/digits/few_shot.py

Against ``classifier.py`` only the lines marked ``# few-shot`` differ.
"""

from __future__ import annotations

import lightning.pytorch as pl
from classifier import Classifier, Digits

from lightning_maml import MAMLModule  # few-shot
from lightning_maml.datamodules import FewShotDataModule  # few-shot

if __name__ == "__main__":
    trainer = pl.Trainer(max_epochs=20, logger=False, enable_checkpointing=False)
    model = Classifier(n_classes=3)  # few-shot: a 3-way head, one output per class of an episode
    data = FewShotDataModule(  # few-shot: episodes from the project's own dataset
        train=Digits(list(range(7))),
        test=Digits([7, 8, 9]),  # few-shot: unseen test classes
        n_way=3,
        k_shot=5,
        query_size=10,
        meta_batch_size=8,
        episodes_per_epoch=400,
    )  # few-shot
    model = MAMLModule(  # few-shot: MAML around the project's network and optimizers
        model.net,
        loss="cross_entropy",
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=10,
        optimizers_from=model,
    )  # few-shot
    trainer.fit(model, data)
    trainer.test(model, data)
