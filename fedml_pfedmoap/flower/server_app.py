"""The Flower ServerApp: the server half of the protocol (``federated.rounds.RoundDriver``) over Flower's Message API.

1. Discovery: ``query`` every connected SuperNode for its ``partition-id`` / ``num-partitions`` until every partition
   is online (``comm_args.startup_timeout_s``, default ``round_timeout_s``).
2. Rounds r = 0..T: one ``train`` message per participant of round r (its download, ``flower/codec.py``) to the
   SuperNode of partition ``client_index mod num-partitions``; ``send_and_receive`` with
   ``comm_args.round_timeout_s``; the uploads go to ``RoundDriver.step``, which logs round r-1's metrics (MLflow via
   ``tracking_args``, and ``<output_dir>/<run_name>/flower_rounds.jsonl``) and builds round r+1's downloads.
3. A SuperNode that replies with an error or not at all within the timeout ends the run: one line naming the round,
   the partition(s), their node ids and clients (``fedml_pfedmoap flower: round R: SuperNode(s) gone: ...``), the
   MLflow run ends FAILED, and ``flower_status.json`` in the run folder says so (the launcher's exit status 3).
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..federated.round_log import RoundLogger
from ..federated.rounds import RoundDriver
from .codec import decode, encode
from .runtime import experiment

app = ServerApp()
STATUS_FILE, ROUNDS_FILE = "flower_status.json", "flower_rounds.jsonl"
PREFIX = "fedml_pfedmoap flower"


class SuperNodeGone(RuntimeError):
    """One or more SuperNodes failed to reply; the message is the documented one line."""


def discover(grid: Grid, timeout_s: float, poll_s: float = 0.5) -> Tuple[Dict[int, int], int]:
    """``({partition-id: node id}, num-partitions)`` once every partition has a connected SuperNode."""
    deadline = time.monotonic() + timeout_s
    found: Dict[int, int] = {}
    num = None
    while True:
        new = [n for n in grid.get_node_ids() if n not in found.values()]
        msgs = [Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query") for n in new]
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())) if msgs else []:
            if reply.has_content():
                node = reply.content.config_records["node"]
                found[int(node["partition-id"])] = reply.metadata.src_node_id
                num = int(node["num-partitions"])
        if num is not None and set(found) >= set(range(num)):
            return found, num
        if time.monotonic() > deadline:
            raise SuperNodeGone(f"{PREFIX}: startup: SuperNode(s) gone: partition-id "
                                f"{sorted(set(range(num or 1)) - set(found))}: not online within {timeout_s:g} s "
                                f"(online: {sorted(found)})")
        time.sleep(poll_s)


def exchange(grid: Grid, r: int, downloads: Dict[int, Dict[str, Any]], nodes: Dict[int, int], num: int,
             timeout_s: float, device: Any) -> List[Dict[str, Any]]:
    """Round r's downloads to their SuperNodes and the uploads back; a missing or failed reply ends the run."""
    chosen = sorted(i for i, d in downloads.items() if d["selected"])
    route = {i: nodes[i % num] for i in chosen}
    msgs = [Message(encode(downloads[i]), dst_node_id=route[i], message_type="train", group_id=str(r))
            for i in chosen]
    sent = {m.object_id: i for i, m in zip(chosen, msgs)}  # a reply names the message it answers
    by_node = {n: p for p, n in nodes.items()}
    uploads, failed = [], {}  # failed: partition -> reason
    for reply in grid.send_and_receive(msgs, timeout=timeout_s):
        cid = sent.get(reply.metadata.reply_to_message_id)  # the SuperLink answers for an unavailable node
        part = cid % num if cid is not None else by_node.get(reply.metadata.src_node_id, -1)
        if reply.has_error():
            failed[part] = f"error {reply.error.code}: {reply.error.reason}"
        else:
            uploads.append(decode(reply.content, device))
    got = {int(u["client_index"]) for u in uploads}
    for i in chosen:
        if i not in got and i % num not in failed:
            failed[i % num] = f"timed out: no reply within round_timeout_s={timeout_s:g} s"
    if failed:
        parts = sorted(failed)
        clients = [i for i in chosen if i % num in failed]
        raise SuperNodeGone(f"{PREFIX}: round {r}: SuperNode(s) gone: partition-id {parts} (node id "
                            f"{[nodes[p] for p in parts]}, clients {clients}): "
                            + "; ".join(f"partition-id {p}: {failed[p]}" for p in parts))
    return uploads


@app.main()
def main(grid: Grid, context: Context) -> None:
    exp = experiment(context.run_config)
    cfg, algo = exp.cfg, exp.algorithm
    t, comm = cfg.train_args, cfg.comm_args
    run_dir = Path(cfg.common_args.output_dir) / cfg.common_args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    status = run_dir / STATUS_FILE
    status.unlink(missing_ok=True)
    tags = {"algorithm": exp.algorithm_name, "dataset": cfg.data_args.dataset, "engine": "flower",
            "flower_run_id": str(context.run_id)}
    log = RoundLogger(cfg, run_name=f"{cfg.common_args.run_name}-{exp.algorithm_name}", tags=tags)
    driver = None
    try:
        driver = RoundDriver(algo, t.client_num_in_total, t.client_num_per_round, t.comm_round, exp.seed,
                             t.eval_every, log, run_dir / ROUNDS_FILE, f"flower-{context.run_id}-{uuid.uuid4().hex[:8]}",
                             t.client_dropout, engine="Flower")
        startup = comm.startup_timeout_s if comm.startup_timeout_s is not None else comm.round_timeout_s
        nodes, num = discover(grid, float(startup))
        downloads = driver.first()
        while not driver.finished:
            uploads = exchange(grid, driver.round, downloads, nodes, num, float(comm.round_timeout_s),
                               algo.rt.device)
            downloads = driver.step(uploads)
    except BaseException as err:
        if driver is not None:
            driver.fail()
        else:
            log.close(status="FAILED")
        line = str(err) if isinstance(err, SuperNodeGone) else f"{PREFIX}: {type(err).__name__}: {err}"
        status.write_text(json.dumps({"status": "FAILED", "error": line}))
        print(line, file=sys.stderr, flush=True)
        raise
    status.write_text(json.dumps({"status": "FINISHED", "rounds": t.comm_round, "partitions": num}))

