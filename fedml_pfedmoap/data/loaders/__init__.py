"""On-disk loaders for the nine benchmark datasets (docs/data.md §Layouts); importing this package registers them.

``caltech101``, ``oxford_flowers``, ``oxford_pets``, ``food101``, ``dtd`` (``coop``: CoOp split JSON, or
``torchvision`` layouts), ``cifar10``, ``cifar100`` (``torchvision`` pickles), ``domainnet``, ``office_caltech10``
(``fedbn`` pickles, or ``imagefolder`` trees). Every builder takes ``root`` (else ``$PFEDMOAP_DATA_ROOT``) and
``layout`` (``auto`` probes coop, torchvision, fedbn, imagefolder in that order), never downloads, and fails with one
``DatasetError`` naming the dataset, every path looked at and the expected layout. Where each dataset lives (folder
spellings, templates, class lists) is written once, in ``specs``.
"""
from . import cifar, coop, domains  # noqa: F401  (registration)
