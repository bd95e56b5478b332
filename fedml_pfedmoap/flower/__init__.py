"""The Flower engine (docs/flower.md): a ServerApp and a ClientApp on Flower's Message API over the same algorithm
protocol and round schedule as the simulator and the FedML cross-silo engine (``federated/rounds.py``).

* ``codec``: protocol dicts <-> ``RecordDict`` (``ArrayRecord`` + ``ConfigRecord``), exact;
* ``server_app`` / ``client_app``: the two halves (``configs/flower/pyproject.toml`` names them);
* ``runtime``: the run config, the per-process experiment, the SuperNode's partition;
* ``launch``: a private SuperLink (simulation) or SuperLink + SuperNodes (deployment) on loopback and ``flwr run``.

Only this package imports ``flwr`` (the ``[flower]`` extra).
"""
