"""Simulation through FedML's entry point (docs/fedml.md §Stack notes).

FedML's single-process simulator builds its own trainer and ignores custom aggregation, so it cannot run a personalized
method. ``FedMLRunner`` accepts any object with ``.run()`` as ``algorithm_flow`` and simply calls it: this module hands
it the suite's in-process ``Simulator`` built by ``build_experiment`` — the loop ``pfedmoap-bench run`` drives — so
the same config and seeds give the same per-round metrics on both paths. Rounds are logged to MLflow and to
``<output_dir>/<run_name>/simulation_rounds.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..experiment import build_experiment
from ..federated.simulator import RunResult, Simulator
from .metrics_log import RoundLogger


def run_simulation(pc: Any, args: Any) -> RunResult:
    """Build the experiment from the plugin config and run it as FedML's ``algorithm_flow``."""
    from fedml import FedMLRunner

    cfg = pc.cfg
    exp = build_experiment(cfg, progress=False)
    out = Path(cfg.common_args.output_dir) / cfg.common_args.run_name / "simulation_rounds.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    tags = {"algorithm": exp.algorithm_name, "dataset": cfg.data_args.dataset, "fedml_mode": "simulation/algorithm_flow",
            "run_id": str(getattr(args, "run_id", "0"))}
    round_logger = RoundLogger(cfg, run_name=f"{cfg.common_args.run_name}-{exp.algorithm_name}", tags=tags)

    def on_round(metrics: Dict[str, Any], sim: Simulator) -> None:
        round_logger.log_round(metrics, step=int(metrics["round"]))
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")

    exp.simulator.on_round = on_round
    try:
        FedMLRunner(args, exp.algorithm.rt.device, None, exp.algorithm.rt.backbone,
                    algorithm_flow=exp.simulator).run()
    except BaseException:
        round_logger.close(status="FAILED")
        raise
    round_logger.close()
    return exp.simulator.result
