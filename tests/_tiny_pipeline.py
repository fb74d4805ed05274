"""The tiny pipeline configuration of the end-to-end tests (in-process, Prefect deployment and
Ray job): 16 simulated subjects + 1 broken file at 4 mm, cached at 6 mm on (16, 20, 16), one
epoch per job, two folds, the shipped `pairwise` sorter. About 15 s of work on 2 cores.
"""

from __future__ import annotations

TINY = {
    "spacing": 6.0, "shape": [16, 20, 16], "test_fraction": 0.25,
    "simulate": {"subjects": 16, "spacing": 4.0, "sites": 2, "corrupt": 1},
    "sorter": {"source": "shipped", "name": "pairwise"},
    "train": {"epochs": 1, "batch_size": 4, "k_folds": 2, "val_fraction": 0.2,
              "options": {"lr": 3e-3, "backbone": {"growth": [4, 8]}, "num_threads": 1}},
    "evaluate": {"n_boot": 20},
}
