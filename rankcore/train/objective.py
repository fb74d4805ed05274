"""The training objective from a TrainConfig: BrainAgeLoss with the chosen rank surrogate.

A sorter is named by a file path or by the name of a shipped sorter (a file
``rankcore/sorters/pretrained/NAME.safetensors``). Fixed-length sorters (SoDeep's LSTM) only
rank sequences of their own length, so they must have ``seq_len == batch_size`` (the GLOBAL
batch, which the loop always fills completely); anything else is refused here, before training
starts, with one clear InputError.
"""

from __future__ import annotations

from pathlib import Path

from rankcore.errors import CheckpointError, InputError, SorterLengthError
from rankcore.losses import BrainAgeLoss, SoftSpearmanLoss, SpearmanLoss
from rankcore.train.config import TrainConfig

__all__ = ["PRETRAINED_DIR", "build_objective", "rank_convention", "resolve_sorter"]

#: Where shipped sorters live (package data).
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "sorters" / "pretrained"


def resolve_sorter(name: str) -> Path:
    """Path of a sorter given as a file path or as a shipped sorter's name.

    Raises:
        InputError: neither an existing file nor a shipped sorter (the message lists those).
    """
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = PRETRAINED_DIR / f"{name}.safetensors"
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in PRETRAINED_DIR.glob("*.safetensors"))
    raise InputError(f"`sorter` must be a sorter file or a shipped sorter name "
                     f"({', '.join(names) or 'none shipped'}), got {name!r}")


def build_objective(config: TrainConfig) -> BrainAgeLoss:
    """BrainAgeLoss(regression, rank surrogate, w_rank, w_diff) for ``config``.

    The weights are :meth:`TrainConfig.objective_weights` (the preset's values filled in).
    With ``config.rank_share`` set, w_rank is not known before training: the loss comes back
    with ``rank_weight = 0`` and :func:`rankcore.train.shares.calibrate_rank_weight` sets it
    (``train_stage`` does this before the first epoch).

    Raises:
        InputError: the sorter cannot be found or loaded, or it is a fixed-length sorter
            whose length differs from ``config.batch_size``.
    """
    rank = None
    if config.rank_loss == "soft":
        rank = SoftSpearmanLoss(config.soft_method, config.soft_strength, config.l1_weight)
    elif config.rank_loss == "sorter":
        from rankcore.sorters import load_sorter

        path = resolve_sorter(config.sorter)
        try:
            sorter = load_sorter(path, seq_len=config.batch_size)
        except SorterLengthError as err:
            raise SorterLengthError(
                f"`batch_size` must equal the fixed length of sorter {str(path)!r}: {err}. "
                "Set batch_size to the sorter's seq_len or use a length-agnostic sorter"
            ) from None
        except CheckpointError as err:
            raise InputError(f"`sorter` {str(path)!r} cannot be loaded: {err}") from None
        sorter.requires_grad_(False)
        rank = SpearmanLoss(sorter, config.l1_weight)
    rank_weight, diff_weight = config.objective_weights()
    return BrainAgeLoss(config.regression, rank, rank_weight or 0.0, diff_weight)


def rank_convention(config: TrainConfig) -> str:
    """The rank convention of the surrogate's targets (recorded in the model card)."""
    if config.rank_loss == "sorter":
        return "sodeep_desc_norm"
    if config.rank_loss == "soft":
        return "ascending_fractional"
    return "none"
