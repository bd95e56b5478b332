"""Datasets and federated partitions (docs/data.md; the layering in docs/architecture.md).

* ``base``: the dataset types and the ``DATASETS`` registry (``build_dataset``);
* ``embedded``: the datasets that install with the package; ``loaders``: the on-disk benchmark datasets;
* ``splits``: split helpers and the ``PARTITIONERS`` registry; ``partition``, ``partition_legacy``: the schemes;
* ``base2novel``, ``validation``: class and validation splits; ``transforms``: CLIP normalization and augmentation.

Importing this package registers every dataset and partition scheme (the modules below register themselves when
imported); no module of the package imports this ``__init__`` back, so the order below is free.
"""
from . import embedded, loaders, partition, partition_legacy  # noqa: F401  (registration)
