"""Measurement helpers of ``pfedmoap-bench perf``: timing, peak memory, text-tower FLOPs and TFLOP/s, SDPA check,
and the stdout table. Cost model: docs/performance.md."""
from __future__ import annotations

import os
import platform
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Optional

import torch

# dense peak TFLOP/s by device-name fragment: (fp32 incl. TF32 tensor cores, bf16); None where unknown (CPUs)
PEAKS = {"H100 PCIe": (378.0, 756.0), "H100": (494.7, 989.4), "H200": (494.7, 989.4), "A100": (156.0, 312.0)}

def machine_info(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, (fp32, bf16) in PEAKS.items():  # most specific first (dict order)
        if frag in name:
            return bf16 if precision == "bf16" else fp32
    return None


def text_flops(model: torch.nn.Module, length: int, prompts: int, backward: bool = True) -> float:
    """FLOPs of the CoOp text path on ``prompts`` sequences of ``length`` tokens (1 MAC = 2 FLOPs, docs/performance.md).

    Per layer and token: QKV + output projections 4W² MACs, MLP 2·r·W² MACs, attention scores and mixing 2·L·W MACs;
    plus the EOT projection W·D. Frozen weights: backward computes activation gradients only (≈ 1× forward).
    """
    tr = model.transformer
    width = int(tr.width)
    layers = int(tr.layers)
    ratio = tr.resblocks[0].mlp.c_fc.out_features / width
    proj = model.text_projection
    d = proj.shape[1] if isinstance(proj, torch.Tensor) else getattr(proj, "out_features", width)
    macs = layers * length * ((4 + 2 * ratio) * width * width + 2 * length * width) + width * d
    return 2.0 * macs * prompts * (2 if backward else 1)


class MemorySampler:
    """Peak process RSS (sampled from /proc/self/statm every 5 ms) and CUDA max-allocated over a phase."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "MemorySampler":
        self.peak = self._rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def report(self) -> Dict[str, float]:
        out = {"peak_rss_mb": self.peak / 2**20}
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, wall seconds); the process CPU seconds of the same call are left in ``LAST_CPU_S`` (CPU runs on a
    shared machine: CPU time is insensitive to other processes' load, wall time is not)."""
    global LAST_CPU_S
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    LAST_CPU_S = time.process_time() - c0
    return out, time.perf_counter() - t0


LAST_CPU_S = 0.0


def text_benchmark(bench: Any, reps: int = 3) -> Dict[str, Any]:
    """Text tower fwd+bwd over all C prompts for one trainable ctx: optimized (truncated) and naive (77 tokens)."""
    out: Dict[str, Any] = {}
    model = bench.backbone.model
    for label, enc in (("fast", bench.text_fast), ("naive", bench.text_naive)):
        if label == "naive" and "naive" not in bench.modes:
            continue
        ctx = torch.zeros(enc.ctx_shape, device=bench.device).normal_(0, 0.02).requires_grad_(True)

        def step() -> None:
            enc.features(ctx).float().pow(2).mean().backward()

        step()  # warm-up
        times = [timed(step, bench.device)[1] for _ in range(reps)]
        secs = sorted(times)[len(times) // 2]
        flops = text_flops(model, enc.length, enc.num_classes)
        out[label] = {"seq_len": enc.length, "fwd_bwd_s": secs, "gflops": flops / 1e9, "tflops_per_s": flops / secs / 1e12}
    peak = peak_tflops(bench.device, bench.precision)
    out["peak_tflops_per_s"] = peak
    if peak:
        out["fast"]["utilization"] = out["fast"]["tflops_per_s"] / peak
    out["attention"] = attention_kernel_report(bench)
    return out


def attention_kernel_report(bench: Any) -> Dict[str, Any]:
    """Count F.scaled_dot_product_attention calls during one text forward (open_clip's MHA path uses SDPA when
    need_weights=False); with the additive causal mask, CUDA picks the memory-efficient kernel, not flash."""
    import torch.nn.functional as F

    calls = {"n": 0, "mask": False}
    orig = F.scaled_dot_product_attention

    def spy(*a: Any, **k: Any) -> torch.Tensor:
        calls["n"] += 1
        calls["mask"] = calls["mask"] or (k.get("attn_mask") is not None or (len(a) > 3 and a[3] is not None))
        return orig(*a, **k)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            bench.text_fast.features(torch.zeros(bench.text_fast.ctx_shape, device=bench.device))
    finally:
        F.scaled_dot_product_attention = orig
    layers = int(bench.backbone.model.transformer.layers)
    return {"sdpa_calls_per_forward": calls["n"], "text_layers": layers, "uses_sdpa": calls["n"] >= layers,
            "with_mask": calls["mask"]}


def lockstep_line(result: Dict[str, Any]) -> str:
    """One line: optimized s/round one client per text call vs K clients per call (``--compare-lockstep K``)."""
    rows = [r for r in result["algorithms"] if "speedup_lockstep" in r]
    if not rows:
        return ""
    k = rows[0]["lockstep_clients_per_call"]
    parts = [f"{r['algorithm']} {r['fast_steady_round_s']:.3f}→{r['lockstep_steady_round_s']:.3f} s "
             f"({r['speedup_lockstep']:.2f}×, max |Δstate| {r['lockstep_max_abs_dstate']:.1e})" for r in rows]
    return f"Lockstep training, {k} clients per text call vs one (steady round): " + "; ".join(parts)


def format_table(result: Dict[str, Any]) -> str:
    """A fixed-width table: one line per algorithm."""
    s = result["settings"]
    head = (f"perf: {result['model']} C={s['classes']} N={s['clients']} shots={s['shots']} batch={s['batch']} "
            f"K={s['experts']} device={result['machine']['device']} precision={s['precision']} "
            f"extract={result['extract_s']:.2f}s")
    cols = ["algorithm", "fast s/rd", "naive s/rd", "×steady", f"fast {s['whole_run']}rd", f"naive {s['whole_run']}rd",
            "×run", "max|Δlogit|", "peak MB"]
    lines = [head, " | ".join(f"{c:>12}" for c in cols)]

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in result["algorithms"]:
        if "error" in r:
            lines.append(f"{r['algorithm']:>12} | error: {r['error']}")
            continue
        mem = r.get("cuda_max_allocated_mb", r.get("peak_rss_mb"))
        vals = [r["algorithm"], f(r.get("fast_steady_round_s"), ".3f"), f(r.get("naive_steady_round_s"), ".3f"),
                f(r.get("speedup_steady"), ".1f"), f(r.get("fast_whole_run_s"), ".2f"),
                f(r.get("naive_whole_run_s"), ".2f"), f(r.get("speedup_whole_run"), ".1f"),
                f(r.get("max_abs_dlogit"), ".2e"), f(mem, ".0f")]
        lines.append(" | ".join(f"{v:>12}" for v in vals))
    t = result.get("text", {})
    if "fast" in t:
        lines.append(f"text fwd+bwd over C prompts: fast L={t['fast']['seq_len']} {t['fast']['fwd_bwd_s']:.4f}s "
                     f"({t['fast']['tflops_per_s']:.3f} TFLOP/s, peak {t.get('peak_tflops_per_s') or 'n/a'})"
                     + (f"; naive L={t['naive']['seq_len']} {t['naive']['fwd_bwd_s']:.4f}s" if "naive" in t else ""))
    if lockstep_line(result):
        lines.append(lockstep_line(result))
    return "\n".join(lines)
