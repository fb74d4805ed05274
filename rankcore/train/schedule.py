"""Learning-rate schedule and early stopping, as small JSON-serialisable state machines.

Kept out of torch's scheduler classes so that the whole state is a few numbers in the
checkpoint card (resuming needs no pickled scheduler object).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rankcore.train.config import TrainConfig

__all__ = ["Progress"]


@dataclass
class Progress:
    """Where training stands: current lr, best validation MAE, epochs without improvement.

    Attributes:
        lr: learning rate for the next epoch.
        best_mae: best validation MAE so far (inf before the first).
        best_epoch: the epoch that reached it (-1 before the first).
        bad_epochs: epochs since the best one (early stopping counter).
        plateau_bad: epochs since the lr was last cut or the MAE improved (plateau schedule).
    """

    lr: float
    best_mae: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    plateau_bad: int = 0

    @classmethod
    def start(cls, config: TrainConfig) -> Progress:
        return cls(lr=config.lr)

    def lr_at(self, config: TrainConfig, epoch: int) -> float:
        """The lr to use during ``epoch`` (0-based)."""
        if config.lr_schedule == "cosine":
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
        return self.lr

    def update(self, config: TrainConfig, epoch: int, score: float) -> bool:
        """Record the epoch's score (val MAE, or train loss without validation).

        Returns:
            True when this epoch is the best so far.
        """
        improved = score < self.best_mae
        if improved:
            self.best_mae, self.best_epoch, self.bad_epochs, self.plateau_bad = score, epoch, 0, 0
        else:
            self.bad_epochs += 1
            self.plateau_bad += 1
        if (config.lr_schedule == "plateau" and not improved
                and self.plateau_bad > config.plateau_patience):
            self.lr *= config.plateau_factor
            self.plateau_bad = 0
        return improved

    def should_stop(self, config: TrainConfig, has_val: bool) -> bool:
        """Early stopping: ``config.early_stopping`` epochs without a better val MAE."""
        return (has_val and config.early_stopping is not None
                and self.bad_epochs >= config.early_stopping)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(**d)
