"""``pfedmoap-bench perf``: naive vs optimized per-round wall time, speed-up, peak memory and text-tower TFLOP/s.

For every algorithm, in ONE process (so ratios are measured side by side under the same machine load):

1. the optimized path runs ``--rounds`` rounds on cached features (one-off extraction timed separately), truncated
   text, runtime caches and ``CoOpModel.scorer`` evaluation;
2. the naive path (``perf_naive``: what the released code does) re-runs round 0 and the last round from the very
   same state (snapshots of server and client state), so the steady-state ratio needs no naive warm-up rounds;
3. both evaluation models of client 0 are scored on its whole test split from that state: max |Δlogit| (fp32);
4. text-tower fwd+bwd over all C prompts is timed alone: achieved TFLOP/s against the device's peak.

The whole-run figure (``--whole-run`` rounds, default 10) is round 0 + (R−1)·steady-state (+ the extraction for the
optimized path), from the measured rounds. Cost model: docs/performance.md.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, List, Optional

import torch

from fedml_pfedmoap.fileio import atomic_write_json

from . import perf_measure
from .perf_measure import MemorySampler, format_table, machine_info, text_benchmark, timed
from .perf_naive import is_prompt_algorithm

SCALES = {"tiny": ("tiny-clip", False), "vit-b-16": ("ViT-B-16", False), "rn50": ("RN50-quickgelu", False)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                   help="tiny CLIP, or real-size ViT-B/16 / RN50 architectures with random weights (no download)")
    p.add_argument("--classes", type=int, default=10, help="C, classes of the whole dataset")
    p.add_argument("--clients", type=int, default=10, help="N clients, all participate")
    p.add_argument("--shots", type=int, default=16, help="training images per client")
    p.add_argument("--test", type=int, default=32, help="test images per client")
    p.add_argument("--batch", type=int, default=16, help="training batch (and the naive test batch)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs (1 with shots == batch: one step per client)")
    p.add_argument("--experts", type=int, default=9, help="K non-local experts of pFedMoAP")
    p.add_argument("--rounds", type=int, default=2, help="optimized rounds measured (>= 2 for a steady state)")
    p.add_argument("--whole-run", type=int, default=10, help="rounds of the projected whole run")
    p.add_argument("--algorithms", default="all", help="comma-separated names, or 'all' (list_algorithms())")
    p.add_argument("--modes", default="fast,naive", help="fast,naive | fast (memory-only runs skip the naive path)")
    p.add_argument("--naive-algorithms", default="all",
                   help="run the naive path only for these (comma-separated; 'all'); the others get the optimized path")
    p.add_argument("--naive-rounds", choices=("both", "last"), default="both",
                   help="naive rounds re-run: round 0 and the last (both), or only the steady-state last round "
                        "(then the whole-run projection uses it for round 0 too, flagged naive_round0_estimated)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast around the frozen towers, fp32 trainable parameters (optimized path)")
    p.add_argument("--batch-eval-text", action="store_true",
                   help="opt-in: all clients' evaluation prompts in batched text calls (Runtime.batch_eval_text)")
    p.add_argument("--train-clients-per-call", type=int, default=1,
                   help="optimized path: clients trained in lockstep with their prompts in one text-tower call")
    p.add_argument("--compare-lockstep", type=int, default=0, metavar="K",
                   help="also re-run the optimized rounds with K clients per text call, side by side (ratio, Δstate)")
    p.add_argument("--compile", action="store_true", help="torch.compile the text transformer (optimized path)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(int(args.threads))
    bench = Bench.build(args)
    result: Dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
                              "machine": machine_info(bench.device), "model": SCALES[args.scale][0],
                              "extract_s": bench.extract_s, "extract_images": bench.data.num_images}
    result["text"] = text_benchmark(bench)
    result["algorithms"] = []
    for name in bench.algorithms:
        print(f"perf: {name} ...", flush=True)
        try:
            row = run_algorithm(bench, name)
        except (RuntimeError, ValueError, NotImplementedError) as err:  # e.g. patch tokens on RN50 for FedOTP
            row = {"algorithm": name, "error": f"{type(err).__name__}: {err}"}
        result["algorithms"].append(row)
        if args.out:
            atomic_write_json(args.out, result, indent=1, default=str)
    print(format_table(result))
    if args.out:
        atomic_write_json(args.out, result, indent=1, default=str)
        print(f"perf: wrote {args.out}")
    return 0


def snapshot(algo: Any, states: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    return {"server": copy.deepcopy(algo.server_state()), "states": copy.deepcopy(states)}


class Bench:
    """Everything shared by the algorithms of one perf run: backbone, data, both text encoders, cached features."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fedml_pfedmoap import list_algorithms
        from fedml_pfedmoap.algorithms import get_algorithm
        from fedml_pfedmoap.clip.backbone import load_clip
        from fedml_pfedmoap.clip.prompt import TextEncoder
        from . import perf_naive as nv

        self.args = args
        self.modes = {m.strip() for m in args.modes.split(",") if m.strip()}
        if not self.modes <= {"fast", "naive"} or "fast" not in self.modes:
            raise ValueError(f"perf --modes: expected 'fast' or 'fast,naive', got {args.modes!r}")
        if args.rounds < 1 or args.whole_run < 1:
            raise ValueError("perf: --rounds and --whole-run must be >= 1")
        want = args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(want)
        self.precision = args.precision
        names = list_algorithms() if args.algorithms == "all" else [a.strip().lower() for a in args.algorithms.split(",")]
        self.algorithms = names
        self.naive_for = set(names) if args.naive_algorithms == "all" else \
            {a.strip().lower() for a in args.naive_algorithms.split(",")}
        classes = [get_algorithm(n) for n in names]  # fails early on an unknown name
        model, quick = SCALES[args.scale]
        torch.manual_seed(args.seed)  # random-init weights, identical for both paths
        self.backbone = load_clip(model, None, device=self.device, force_quick_gelu=quick)
        self.patches = nv.needs_patches(classes)
        self.data = nv.synthetic_data(self.backbone, args.classes, args.clients, args.shots, args.test,
                                      self.patches, args.seed)
        self.text_fast = TextEncoder(self.backbone, self.data.classnames, truncate=True).to(self.device)
        self.text_naive = TextEncoder(self.backbone, self.data.classnames, truncate=False).to(self.device)
        set_precision(self, args.precision)
        if args.compile:
            self.text_fast.compile_transformer()

        def extract():
            return ([nv.encode_all(self.backbone, s, self.patches) for s in self.data.train],
                    [nv.encode_all(self.backbone, s, self.patches) for s in self.data.test])

        (self.fast_train, self.fast_test), self.extract_s = timed(extract, self.device)
        self.extract_cpu_s = perf_measure.LAST_CPU_S
        self._stream_sets: Dict[int, Any] = {}

    @classmethod
    def build(cls, args: argparse.Namespace) -> "Bench":
        return cls(args)

    def runtime(self, naive: bool, per_call: Optional[int] = None):
        from fedml_pfedmoap.algorithms.protocol import Runtime
        from .perf_naive import NeverHitCache

        a = self.args
        kw = dict(backbone=self.backbone, num_clients=a.clients, seed=a.seed, local_epochs=a.epochs,
                  batch_size=a.batch, device=self.device, rounds=a.whole_run)
        if naive:
            return Runtime(text=self.text_naive, eval_batch_size=a.batch, cache=NeverHitCache(), **kw)
        return Runtime(text=self.text_fast, batch_eval_text=bool(a.batch_eval_text),
                       train_clients_per_call=int(per_call or a.train_clients_per_call), **kw)

    def stream_block(self, name: str) -> Optional[int]:
        """The cached visual block of a method that trains the top of the image tower (pFedMMA), else None."""
        from fedml_pfedmoap.algorithms import get_algorithm
        from .perf_naive import algorithm_params

        cls = get_algorithm(name)
        block_for = getattr(cls, "stream_block_for", None)
        params = cls.parse_params(algorithm_params(name, self.args.experts) or {})
        return None if block_for is None else block_for(self.backbone, params)

    def sets(self, name: str, naive: bool) -> tuple:
        """(train sets, test sets) of ``name``'s path: raw images (naive) or cached features / stream tokens."""
        from . import perf_naive as nv

        block = self.stream_block(name)
        if block is None:
            return (self.data.train, self.data.test) if naive else (self.fast_train, self.fast_test)
        if naive:
            return [s.with_stream(block) for s in self.data.train], [s.with_stream(block) for s in self.data.test]
        if block not in self._stream_sets:  # one-off extraction of the stream after the unchanged blocks
            self._stream_sets[block] = tuple([nv.encode_all(self.backbone, s, True, stream_block=block) for s in ss]
                                             for ss in (self.data.train, self.data.test))
        return self._stream_sets[block]

    def clients(self, naive: bool, name: str):
        from fedml_pfedmoap.federated.simulator import ClientData

        return [ClientData(tr, te) for tr, te in zip(*self.sets(name, naive))]

    def make(self, name: str, naive: bool, snap: Optional[Dict[str, Any]] = None, per_call: Optional[int] = None):
        """A fresh algorithm + simulator for one path, optionally restored to a snapshot (server + client states)."""
        from fedml_pfedmoap.algorithms import get_algorithm
        from fedml_pfedmoap.federated.simulator import Simulator
        from .perf_naive import algorithm_params, naive_algorithm

        cls = get_algorithm(name)
        cls = naive_algorithm(cls) if naive else cls
        algo = cls(self.runtime(naive, per_call), algorithm_params(name, self.args.experts))
        sim = Simulator(algo, self.clients(naive, name), rounds=self.args.whole_run, frac=1.0, seed=self.args.seed,
                        progress=False)
        if snap is not None:
            algo.load_server_state(copy.deepcopy(snap["server"]))
            sim.states = copy.deepcopy(snap["states"])
        return algo, sim


def set_precision(bench: Bench, precision: str) -> None:
    """bf16 autocast around the frozen towers of the optimized path (trainable parameters stay fp32)."""
    if precision == "fp32":
        return
    if not hasattr(bench.text_fast, "autocast_dtype"):
        raise ValueError("perf --precision bf16: this version's TextEncoder has no autocast support")
    bench.text_fast.autocast_dtype = torch.bfloat16
    bench.backbone.autocast_dtype = torch.bfloat16


PERF_ROUND_KEYS = ("round_time_s", "time_train_s", "time_eval_s", "acc_mean", "test_loss", "train_loss")  # per-round JSON


def _round(m: Dict[str, Any]) -> Dict[str, Any]:
    return {k: m[k] for k in PERF_ROUND_KEYS if k in m}


@torch.no_grad()
def logit_check(bench: Bench, name: str, snap: Dict[str, Any], cid: int = 0) -> Dict[str, Any]:
    """Client ``cid`` from one state: evaluation logits (scorer vs per-batch re-encoding on raw images) and training
    logits (the train-mode model's forward), optimized vs naive; max |Δlogit|."""
    fast, _ = bench.make(name, naive=False, snap=snap)
    naive, _ = bench.make(name, naive=True, snap=snap)
    fast_test, naive_test = bench.sets(name, False)[1][cid], bench.sets(name, True)[1][cid]
    n_test = len(fast_test)
    fb, nb = fast_test.chunks(n_test).__next__(), naive_test.chunks(n_test).__next__()
    if hasattr(fast, "eval_logits"):  # adapter methods: evaluation logits from the same state, both paths
        st = snap["states"].get(cid) or fast.init_client_state(cid)
        lf, ln = (a.eval_logits(a.eval_payload(cid), copy.deepcopy(st), b) for a, b in ((fast, fb), (naive, nb)))
        return {"max_abs_dlogit": float((lf - ln).abs().max()), "max_abs_logit": float(ln.abs().max())}
    if not is_prompt_algorithm(fast):  # zero-shot: compare evaluation losses instead
        st = copy.deepcopy(snap["states"].get(cid, {}))
        rf = fast.evaluate(fast.eval_payload(cid), st, fast_test)
        rn = naive.evaluate(naive.eval_payload(cid), st, naive_test)
        return {"max_abs_dlogit": None, "eval_loss_diff": abs(rf.loss - rn.loss)}
    out: Dict[str, Any] = {}
    diffs = []
    for train in (False, True):
        logits = []
        for algo, batch in ((fast, fb), (naive, nb)):
            st = copy.deepcopy(snap["states"].get(cid, algo.init_client_state(cid)))
            payload = algo.client_payload(cid) if train else algo.eval_payload(cid)
            model = algo.build_model(payload, st, train=train)
            model.prepare()
            logits.append((model(batch) if train else model.scorer()(batch)).float())
        diffs.append(float((logits[0] - logits[1]).abs().max()))
        out["max_abs_logit"] = float(logits[1].abs().max())
    out["max_abs_dlogit_eval"], out["max_abs_dlogit_train"] = diffs
    out["max_abs_dlogit"] = max(diffs)
    return out


def _max_abs_diff(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        return max([_max_abs_diff(a[k], b[k]) for k in a] or [0.0])
    return 0.0


def lockstep_rounds(bench: Bench, name: str, snap0: Dict[str, Any], fast_states: Dict[int, Dict[str, Any]],
                    per_call: int) -> Dict[str, Any]:
    """The optimized rounds again from the same start, ``per_call`` clients per text call (algorithms/training.py):
    steady-round time, its ratio to the one-client-at-a-time optimized path, and max |Δ| of the final client states."""
    algo, sim = bench.make(name, naive=False, snap=snap0, per_call=per_call)
    rounds = []
    for t in range(bench.args.rounds):
        m, secs = timed(lambda: sim.run_round(t), bench.device)
        rounds.append({**_round(m), "wall_s": secs, "cpu_s": perf_measure.LAST_CPU_S})
    return {"lockstep_clients_per_call": per_call, "lockstep_rounds": rounds,
            "lockstep_steady_round_s": rounds[-1]["wall_s"],
            "lockstep_max_abs_dstate": _max_abs_diff(fast_states, sim.states)}


def run_algorithm(bench: Bench, name: str) -> Dict[str, Any]:
    """Optimized rounds 0..R−1; naive round 0 and R−1 from the same snapshots; logits; projections."""
    a = bench.args
    algo, sim = bench.make(name, naive=False)
    snaps: Dict[int, Dict[str, Any]] = {}
    last = a.rounds - 1
    fast_rounds: List[Dict[str, Any]] = []
    with MemorySampler(bench.device) as mem:
        for t in range(a.rounds):
            if t in (0, last):
                snaps[t] = snapshot(algo, sim.states)
            m, secs = timed(lambda: sim.run_round(t), bench.device)
            fast_rounds.append({**_round(m), "wall_s": secs, "cpu_s": perf_measure.LAST_CPU_S})
    row: Dict[str, Any] = {"algorithm": name, "fast_rounds": fast_rounds, **mem.report()}
    steady_f = fast_rounds[last]["wall_s"]
    row["fast_steady_round_s"] = steady_f
    row["fast_whole_run_s"] = bench.extract_s + fast_rounds[0]["wall_s"] + (a.whole_run - 1) * steady_f
    if a.compare_lockstep > 1 and is_prompt_algorithm(algo):
        row.update(lockstep_rounds(bench, name, snaps[0], sim.states, a.compare_lockstep))
        row["speedup_lockstep"] = steady_f / row["lockstep_steady_round_s"]
    if "naive" not in bench.modes or name not in bench.naive_for:
        return row
    naive_rounds: Dict[int, Dict[str, Any]] = {}
    for t in sorted(snaps) if a.naive_rounds == "both" else [last]:
        nalgo, nsim = bench.make(name, naive=True, snap=snaps[t])
        nsim.next_round = t
        m, secs = timed(lambda: nsim.run_round(t), bench.device)
        naive_rounds[t] = {**_round(m), "wall_s": secs, "cpu_s": perf_measure.LAST_CPU_S}
    row["naive_rounds"] = {str(k): v for k, v in naive_rounds.items()}
    steady_n = naive_rounds[last]["wall_s"]
    row["naive_steady_round_s"] = steady_n
    row["naive_round0_estimated"] = 0 not in naive_rounds
    row["naive_whole_run_s"] = naive_rounds.get(0, naive_rounds[last])["wall_s"] + (a.whole_run - 1) * steady_n
    row["speedup_steady"] = steady_n / steady_f
    row["speedup_steady_cpu_time"] = naive_rounds[last]["cpu_s"] / max(fast_rounds[last]["cpu_s"], 1e-9)
    n_cpu = naive_rounds.get(0, naive_rounds[last])["cpu_s"] + (a.whole_run - 1) * naive_rounds[last]["cpu_s"]
    f_cpu = bench.extract_cpu_s + fast_rounds[0]["cpu_s"] + (a.whole_run - 1) * fast_rounds[last]["cpu_s"]
    row["speedup_whole_run_cpu_time"] = n_cpu / max(f_cpu, 1e-9)
    row["speedup_whole_run"] = row["naive_whole_run_s"] / row["fast_whole_run_s"]
    f_last, n_last = fast_rounds[last], naive_rounds[last]
    if "acc_mean" in f_last and "acc_mean" in n_last:
        row["acc_equal"] = abs(f_last["acc_mean"] - n_last["acc_mean"]) < 1e-9
        row["test_loss_diff"] = abs(f_last["test_loss"] - n_last["test_loss"])
    row.update(logit_check(bench, name, snaps[last]))
    return row

