"""Datasets (``base``: the registry and ``build_dataset``), the embedded ones (``embedded``), the on-disk loaders
(``loaders``), partitions (``partition``) and image transforms (``transforms``).

Registration happens when ``build_dataset`` (or ``benchmark_suite``'s grid validation) imports ``embedded`` and
``loaders``; this package imports nothing itself, so ``import fedml_pfedmoap.data.partition`` stays light.
"""
