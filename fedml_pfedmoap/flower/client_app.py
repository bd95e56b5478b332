"""The Flower ClientApp: the client half of the protocol (``federated.rounds.serve_client``) behind Flower messages.

* ``query``: replies with the SuperNode's ``partition-id`` / ``num-partitions`` (the ServerApp routes client ``i`` to
  partition ``i mod num-partitions``);
* ``train``: one download in (``flower/codec.py``), one upload out; the client index and round travel in both, the
  client's state is loaded from and saved to ``comm_args.state_dir`` (default ``<output_dir>/<run_name>/client_state``)
  by client index under the run tag the server chose. A download for a client of another partition is refused.
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..federated.rounds import ProtocolError, serve_client
from .codec import decode, encode
from .runtime import experiment, partition_of, serves

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, num = partition_of(context.node_config)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": num})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, num = partition_of(context.node_config)
    exp = experiment(context.run_config)
    download = decode(msg.content, exp.algorithm.rt.device)
    cid = int(download["client_index"])
    if not serves(cid, pid, num):
        raise ProtocolError(f"SuperNode of partition-id {pid}: sent client {cid}, which partition "
                            f"{cid % num} serves")
    cfg = exp.cfg
    root = Path(cfg.comm_args.state_dir) if cfg.comm_args.state_dir else \
        Path(cfg.common_args.output_dir) / cfg.common_args.run_name / "client_state"
    upload = serve_client(exp.algorithm, exp.simulator.clients, root, download, pid, f"partition-id {pid}")
    return Message(encode(upload), reply_to=msg)
