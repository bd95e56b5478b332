#!/usr/bin/env bash
# Prepared GPU check (issue 9): the perf table at ViT-B/16 scale (random weights, no download) and a 2-round
# pFedMoAP + FedOTP run through the real experiment path, on one GPU with no internet, in under 8 minutes (step limits sum to 475 s).
#
#   run from the repository root, with the wheel folder .whl/ carried (open_clip_torch, ftfy, wcwidth, regex):
#   OUT=results/perf bash benchmark_suite/gpu_check.sh
#   (CPU dry run of the plumbing: SCALE=tiny DEVICE=cpu E2E_MODEL=tiny-clip OUT=/tmp/x bash benchmark_suite/gpu_check.sh)
#
# Every step has its own time limit and writes its JSON as soon as it finishes, so a late failure keeps the rest.
set -u
OUT="${OUT:-./results/perf}"
SCALE="${SCALE:-vit-b-16}" DEVICE="${DEVICE:-cuda}" E2E_MODEL="${E2E_MODEL:-ViT-B-16}"
export DEVICE E2E_MODEL
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ! python3 -c "import open_clip" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
BENCH="python3 -m benchmark_suite.cli perf --scale $SCALE --device $DEVICE --clients 10 --experts 9"
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  say "start $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  say "end $name rc=$? after $((SECONDS - t0))s"
}
# 1. the anchor setting (C = 10, one class per client, 16 shots, batch 16), every prompt method, naive vs optimized, fp32
PROMPT_ALGOS=dpfpl,fedotp,fedpgp,fedpha,fedprox,fedtpg,local,pfedmoap,pfedmoap_lambda0,promptfl,promptfolio,zeroshot
step anchor_c10 75 $BENCH --classes 10 --shots 16 --batch 16 --rounds 3 --algorithms $PROMPT_ALGOS \
  --out "$OUT/gpu_vitb16_c10_fp32.json"
# 2. C = 100 (10 classes per client), every prompt method, naive vs optimized, fp32
step c100 90 $BENCH --classes 100 --shots 16 --batch 16 --rounds 3 --algorithms $PROMPT_ALGOS \
  --out "$OUT/gpu_vitb16_c100_fp32.json"
# 3. C = 100, bf16 autocast on the frozen towers (optimized path), naive reference in fp32
step c100_bf16 75 $BENCH --classes 100 --shots 16 --batch 16 --rounds 3 --precision bf16 --algorithms $PROMPT_ALGOS \
  --out "$OUT/gpu_vitb16_c100_bf16.json"
# 4. peak memory: C = 100, batch 32, optimized path only, every prompt method
step mem_c100_b32 50 $BENCH --classes 100 --shots 32 --batch 32 --rounds 2 --modes fast --algorithms $PROMPT_ALGOS \
  --out "$OUT/gpu_vitb16_c100_b32_memory.json"
# 5. a 2-round pFedMoAP + FedOTP run through build_experiment (embedded digits, ViT-B/16 random weights)
step e2e_2rounds 80 python3 - "$OUT/gpu_e2e_pfedmoap_fedotp.json" <<'PY'
import json, os, sys, time, torch
from fedml_pfedmoap.config import load_config
from fedml_pfedmoap.experiment import Resources, build_experiment
out, res, rows = sys.argv[1], Resources(), []
for precision in ("fp32", "bf16"):
    cfg = load_config("configs/quickstart.yaml", [
        f"model_args.model={os.environ['E2E_MODEL']}", "model_args.pretrained=null", f"model_args.precision={precision}",
        f"device_args.device={os.environ['DEVICE']}",
        "common_args.cache_dir=/tmp/pfedmoap_cache", "tracking_args.mlflow_tracking_uri=null",
        "train_args.comm_round=2", "train_args.epochs=1", "train_args.batch_size=16"])
    for algo in ("pfedmoap", "fedotp"):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        exp = build_experiment(cfg, algo, progress=False)
        t_build = time.perf_counter() - t0
        result = exp.simulator.run()
        rows.append({"algorithm": algo, "precision": precision, "build_s": t_build, "rounds": result.rounds,
                     "summary": result.summary,
                     "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})
        print(algo, precision, f"build {t_build:.1f}s", [round(r["round_time_s"], 3) for r in result.rounds],
              result.summary, flush=True)
        json.dump({"gpu": torch.cuda.get_device_name(0) if cuda else None, "runs": rows}, open(out, "w"), indent=1, default=str)
PY
# 6. lockstep training: optimized rounds with one client per text call, then again with all 10 clients' prompts in one
#    text-tower call per step, side by side in one process (speed-up and max |Δstate|)
step lockstep_c100 45 $BENCH --classes 100 --shots 16 --batch 16 --rounds 3 --modes fast \
  --algorithms promptfl,fedprox,fedpgp,promptfolio,fedotp,pfedmoap --compare-lockstep 10 \
  --out "$OUT/gpu_vitb16_c100_lockstep10.json"
# 7. optional: torch.compile of the text transformer (pFedMoAP only; compilation time included in round 0)
step compile_c100 60 $BENCH --classes 100 --shots 16 --batch 16 --rounds 3 --algorithms pfedmoap --modes fast \
  --compile --out "$OUT/gpu_vitb16_c100_compile.json"
# 8. the methods that train inside the towers: cached lower layers vs whole towers every step (max |Δlogit|, ratio)
step tower_c10 90 $BENCH --classes 10 --shots 16 --batch 16 --rounds 2 --algorithms pfedmma,fedmgp \
  --out "$OUT/gpu_vitb16_c10_tower.json"
say "done; JSON files:"
ls -la "$OUT" | tee -a "$LOG"
