"""Sizes and inputs of the backbone and its regression head: one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from rankcore.errors import InputError
from rankcore.models.blocks import NORMS

__all__ = ["FEATURE_NORMS", "BackboneConfig"]

#: Standardisations of the pooled CNN features before the head (see :class:`BackboneConfig`).
FEATURE_NORMS = ("batch", "layer", "none")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _names(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not hasattr(value, "__iter__") \
            or not all(isinstance(x, str) and x for x in value):
        raise InputError(f"`{name}` must be a sequence of non-empty names, got {value!r}")
    value = tuple(value)
    if len(set(value)) != len(value):
        raise InputError(f"`{name}` must not repeat a name, got {value!r}")
    return value


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of the backbone and its regression head (validated on construction).

    Attributes:
        in_channels: image channels (channel 0 the z-scored intensity, then any tissue
            probability maps of the cache). The training loop sets it from the training data;
            a saved model refuses images with another number of channels.
        input_pool: average-pooling factor applied to the input first (1 = none, the default:
            the stem reads the cache's voxels).
        stem_channels: output channels of the stem convolution.
        stem_kernel: cubic kernel size of the stem (odd).
        stem_stride: stride of the stem. The default 2 suits the default 2 mm cache: the stem
            reads 2 mm voxels and the first dense block works at 4 mm. For a 3 mm cache use
            ``stem_stride=1, stem_kernel=3, stem_pool=2`` (the stem at 3 mm, the first block
            at 6 mm).
        stem_pool: max-pooling factor after the stem (1 = none, the default). With a stride-1
            stem, 2 keeps the stem's filters (tissue boundaries, partial volume) at the
            cache's resolution and pools their strongest responses, so the dense blocks start
            at twice the voxel size instead of paying for a full-resolution block.
        growth: new channels added by each dense block; its length is the number of blocks
            (each block halves the grid with a max-pool).
        se_reduction: channel reduction inside squeeze-and-excitation.
        sex_features: width of the sex branch (0 disables sex as an input).
        head_hidden: hidden width of the regression head.
        dropout: dropout before the head (0 disables).
        norm: ``"batch"`` (the reference) or ``"group"`` normalisation after each convolution
            (:func:`~rankcore.models.blocks.make_norm`).
        feature_norm: standardisation of the globally pooled CNN features before the head:
            ``"batch"`` (default; BatchNorm1d without affine parameters: zero mean and unit
            variance across subjects, running statistics at evaluation), ``"layer"``
            (LayerNorm over each subject's feature vector) or ``"none"``. The histogram and
            tabular inputs are standardised with training-set statistics, so the head sees
            the CNN and the closed-form inputs on one scale.
        local_norm: window (voxels of the pooled input grid, odd) of the parameter-free local
            contrast normalisation applied to the CNN's input
            (:class:`~rankcore.models.blocks.LocalContrastNorm`); 0 (default) disables it,
            keeping the tissue contrast of the cache's global z-score inside the brain.
        hist_bins: bins of the intensity-histogram branch
            (:class:`~rankcore.models.blocks.IntensityHistogram`, on channel 0), concatenated
            with the CNN features and read by the prior; 0 disables it.
        hist_pool: average-pooling factor of the histogram branch's own copy of the input.
        hist_window: window (voxels of the histogram branch's grid, odd) of its local
            contrast normalisation; 0 disables it.
        sites: the acquisition sites the model knows, as a one-hot input to the head (set by
            the training loop from the training data; empty = no site input). A subject from
            another or an unknown site gets the average of the known sites' codes.
        features: names of the tabular features (tissue volumes, regional fractions) the
            model reads next to the image, in order (set by the training loop from the
            training data; empty = none). They are standardised with training-set statistics
            (missing values become the mean), feed the head and the closed-form prior.

    The defaults give 109,871 parameters for the stage-1 regressor (:class:`AgeRegressor`),
    plus 32 per site and 32 per tabular feature it is given (both enter the head).
    """

    in_channels: int = 1
    input_pool: int = 1
    stem_channels: int = 8
    stem_kernel: int = 5
    stem_stride: int = 2
    stem_pool: int = 1
    growth: tuple[int, ...] = (8, 16, 24, 32)
    se_reduction: int = 4
    sex_features: int = 8
    head_hidden: int = 32
    dropout: float = 0.1
    norm: str = "group"
    feature_norm: str = "batch"
    local_norm: int = 0
    hist_bins: int = 24
    hist_pool: int = 1
    hist_window: int = 13
    sites: tuple[str, ...] = ()
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int(self.in_channels, "in_channels", 1)
        _check_int(self.input_pool, "input_pool", 1)
        _check_int(self.stem_channels, "stem_channels", 1)
        _check_int(self.stem_kernel, "stem_kernel", 1)
        if self.stem_kernel % 2 == 0:
            raise InputError(f"`stem_kernel` must be odd, got {self.stem_kernel}")
        _check_int(self.stem_stride, "stem_stride", 1)
        _check_int(self.stem_pool, "stem_pool", 1)
        growth = self.growth
        if isinstance(growth, int | str) or not hasattr(growth, "__iter__"):
            raise InputError(f"`growth` must be a sequence of positive integers, got {growth!r}")
        growth = tuple(growth)
        if not growth:
            raise InputError("`growth` must hold at least one block width, got ()")
        for g in growth:
            _check_int(g, "growth", 1)
        object.__setattr__(self, "growth", growth)
        _check_int(self.se_reduction, "se_reduction", 1)
        _check_int(self.sex_features, "sex_features", 0)
        _check_int(self.head_hidden, "head_hidden", 1)
        if self.norm not in NORMS:
            raise InputError(f"`norm` must be one of {NORMS}, got {self.norm!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise InputError(f"`feature_norm` must be one of {FEATURE_NORMS}, got "
                             f"{self.feature_norm!r}")
        _check_int(self.local_norm, "local_norm", 0)
        if self.local_norm and (self.local_norm < 3 or self.local_norm % 2 == 0):
            raise InputError(f"`local_norm` must be 0 or an odd integer >= 3, got "
                             f"{self.local_norm}")
        _check_int(self.hist_bins, "hist_bins", 0)
        if self.hist_bins == 1:
            raise InputError("`hist_bins` must be 0 or an integer >= 2, got 1")
        _check_int(self.hist_pool, "hist_pool", 1)
        _check_int(self.hist_window, "hist_window", 0)
        if self.hist_window and (self.hist_window < 3 or self.hist_window % 2 == 0):
            raise InputError(f"`hist_window` must be 0 or an odd integer >= 3, got "
                             f"{self.hist_window}")
        object.__setattr__(self, "sites", _names(self.sites, "sites"))
        object.__setattr__(self, "features", _names(self.features, "features"))
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise InputError(f"`dropout` must be a number in [0, 1), got {self.dropout!r}")

    @property
    def prior_inputs(self) -> int:
        """Width of the closed-form prior's input: histogram bins + tabular features."""
        return self.hist_bins + len(self.features)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples as lists); :meth:`from_dict` inverts it."""
        d = asdict(self)
        for key in ("growth", "sites", "features"):
            d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackboneConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused.

        A partial dict takes today's defaults for what it leaves out. A config saved before a
        field existed gets the value that reproduces the model it describes instead:
        ``hist_pool``/``hist_window`` from ``input_pool``/``local_norm`` (its histogram read
        the CNN's input); ``feature_norm`` ``"none"`` and ``stem_pool`` 1 for a card that
        lists the stem's sizes but no ``feature_norm``.
        """
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"`backbone` has unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if _LEGACY_KEYS <= set(d) and "feature_norm" not in d:  # a card from before both
            d["feature_norm"] = "none"
            d.setdefault("stem_pool", 1)
        if "hist_bins" in d and "hist_pool" not in d and "hist_window" not in d:
            d["hist_pool"] = d.get("input_pool", cls.input_pool)
            d["hist_window"] = d.get("local_norm", cls.local_norm)
        for key in ("growth", "sites", "features"):
            if key in d and isinstance(d[key], list):
                d[key] = tuple(d[key])
        return cls(**d)


#: Keys every saved config held before ``feature_norm`` and ``stem_pool`` existed: a dict with
#: all of them and no ``feature_norm`` is such a card (see :meth:`BackboneConfig.from_dict`).
_LEGACY_KEYS = frozenset({"input_pool", "stem_channels", "stem_kernel", "stem_stride", "growth"})
