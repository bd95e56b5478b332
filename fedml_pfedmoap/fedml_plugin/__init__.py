"""The FedML plugin: run this package's algorithms through FedML 0.9.6 (``python -m fedml_pfedmoap --cf cfg.yaml``).

* ``guard``: offline FedML (no ops-server config fetch, no environment probes, no cloud tracking), FedML's files under
  a directory the config controls, and an optional network audit hook;
* ``config``: FedML YAML / args namespace <-> the suite's ``Config`` (``federated_optimizer`` -> this package's registry);
* ``simulation``: the in-process ``Simulator`` behind ``FedMLRunner(algorithm_flow=...)``;
* ``cross_silo``: ``ClientTrainer`` / ``ServerAggregator`` adapters over MPI or gRPC, with per-client payloads, per-client
  state by client index (``state``) and round timeouts (``watchdog``).

Only ``simulation`` and ``cross_silo`` import FedML; import them lazily (``import fedml`` takes seconds).
"""
