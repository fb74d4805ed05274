"""Learned sorters (SoDeep, Engilberge et al., CVPR 2019): families, training data, checkpoints.

A sorter maps scores (..., N) to predicted ranks (..., N) in SoDeep's convention
``sodeep_desc_norm`` ((N + 1 − R)/N, the largest value gets 1/N), normalising its input inside
``forward`` so raw ages and z-scores give the same output.

- :func:`build_sorter` — ``lstm`` (fixed length), ``gru``, ``cnn``, ``pairwise`` (length-agnostic;
  ``pairwise`` is also permutation-equivariant).
- :class:`SequenceSampler`, :func:`fixed_eval_set` — synthetic sequences with ties and
  tie-aware targets.
- :func:`save_sorter`, :func:`load_sorter` — safetensors weights + JSON card, no pickle.
- :func:`list_pretrained`, :func:`load_pretrained` — the sorters shipped in the package.
"""

from rankcore.sorters.base import CONVENTION, Sorter, normalize_sequences
from rankcore.sorters.checkpoint import load_sorter, save_sorter
from rankcore.sorters.evalset import EvalBatch, fixed_eval_set
from rankcore.sorters.registry import SORTER_KINDS, build_sorter, sorter_sizes
from rankcore.sorters.sampler import FAMILIES, SequenceSampler
from rankcore.sorters.shipped import list_pretrained, load_pretrained, pretrained_path

__all__ = [
    "CONVENTION",
    "FAMILIES",
    "SORTER_KINDS",
    "EvalBatch",
    "SequenceSampler",
    "Sorter",
    "build_sorter",
    "fixed_eval_set",
    "list_pretrained",
    "load_pretrained",
    "load_sorter",
    "normalize_sequences",
    "pretrained_path",
    "save_sorter",
    "sorter_sizes",
]
