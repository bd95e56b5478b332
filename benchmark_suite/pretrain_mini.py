"""``pfedmoap-bench pretrain-mini``: build (or load from the cache) the offline mini CLIP and report its quality.

The checkpoint is cached under ``<cache-dir>/mini_clip/<recipe hash>/`` and built on first use. ``--out`` also writes
it to a path; ``--out fedml_pfedmoap/assets/mini-clip.safetensors`` regenerates the committed checkpoint that
``model_args.pretrained: package:mini-clip.safetensors`` selects. Prints the pretraining time and the zero-shot
accuracy on held-out pretraining data (MNIST test, silhouettes of the pretraining half) and on the downstream data
(scikit-learn digits, held-out silhouettes), measured through ``load_clip("mini-clip", pretrained=<path>)``.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedml_pfedmoap.config import CommonArgs
    from fedml_pfedmoap.miniclip import Recipe

    r = Recipe()
    parser.add_argument("--seed", type=int, default=r.seed, help="pretraining seed (default %(default)s)")
    parser.add_argument("--steps", type=int, default=r.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=r.batch_size, help="images per step (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads; results are deterministic for a "
                        "given seed and thread count (default %(default)s)")
    parser.add_argument("--cache-dir", default=CommonArgs().cache_dir, help="cache root (default %(default)s)")
    parser.add_argument("--out", default=None, help="also write the checkpoint to this path")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache holds this recipe")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation")


def main(args: argparse.Namespace) -> int:
    import torch

    from fedml_pfedmoap.clip.backbone import file_digest
    from fedml_pfedmoap.miniclip import (MODEL_NAME, PACKAGED, Recipe, checkpoint_metadata, ensure_checkpoint,
                                         evaluate_checkpoint, max_weight_difference, packaged_checkpoint)

    logging.getLogger().setLevel(logging.WARNING)  # open_clip's model-building chatter
    logging.getLogger("fedml_pfedmoap.miniclip").setLevel(logging.INFO)  # progress every 50 steps

    if args.steps < 1 or args.batch_size < 2 or args.threads < 1:
        raise ValueError("pretrain-mini: --steps >= 1, --batch-size >= 2 and --threads >= 1 are required")
    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed, steps=args.steps, batch_size=args.batch_size)
    print(f"mini CLIP recipe {recipe.hash()}: seed {recipe.seed}, {recipe.steps} steps × {recipe.batch_size} images, "
          f"{args.threads} thread(s)")
    t0 = time.perf_counter()
    path, stats = ensure_checkpoint(recipe, args.cache_dir, force=args.force)
    if stats.get("cached"):
        print(f"cached checkpoint: {path} (built earlier in {stats.get('time_train_s', float('nan')):.1f} s of "
              f"training with {stats.get('threads', '?')} thread(s); --force rebuilds)")
    else:
        print(f"pretraining time: {stats['time_train_s']:.1f} s training + {stats['time_data_s']:.1f} s data "
              f"({time.perf_counter() - t0:.1f} s wall, {torch.get_num_threads()} thread(s); training used "
              f"{stats['cpu_train_s']:.0f} CPU-s, i.e. about {stats['cpu_train_s'] / args.threads:.0f} s on "
              f"{args.threads} idle cores); final loss {stats['loss_history'][-1][1]:.4f}, logit scale "
              f"{stats['logit_scale']:.1f}")
    size_mb = path.stat().st_size / 2**20
    print(f"checkpoint: {path} ({size_mb:.2f} MiB, sha256 {file_digest(path)}, "
          f"recipe {checkpoint_metadata(path).get('recipe_hash')})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        print(f"written to {out}")
    packaged = packaged_checkpoint()
    if packaged.is_file():
        if file_digest(packaged) == file_digest(path):
            print(f"packaged checkpoint ({PACKAGED}): bit-identical")
        else:  # multi-threaded float summation order is not bit-reproducible across processes
            recipe_of = checkpoint_metadata(packaged).get("recipe_hash")
            print(f"packaged checkpoint ({PACKAGED}): not bit-identical; largest weight difference "
                  f"{max_weight_difference(packaged, path):.2e} (packaged recipe {recipe_of})")
    if not args.no_eval:
        t1 = time.perf_counter()
        acc = evaluate_checkpoint(path)
        print(f"zero-shot accuracy of {MODEL_NAME} (template 'a photo of a {{}}.', 10 classes each, chance 10%):")
        for key, value in acc.items():
            print(f"  {key:<40} {100 * value:6.2f}%")
        print(f"(evaluation {time.perf_counter() - t1:.1f} s)")
    return 0
