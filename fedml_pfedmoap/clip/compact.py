"""A compact, exact safetensors format for small open_clip checkpoints whose token embedding barely trained.

The mini CLIP (``miniclip.py``) trains only the few hundred token-embedding rows its captions can contain; the other
~49k rows of the 49408 × W table stay at the model's seeded random init, yet they are ~94% of an fp16 state dict. This
format stores every other tensor as usual plus ``token_embedding.rows`` / ``token_embedding.ids`` (the rows that differ
from the init) and the init's seed; reading rebuilds the table from ``open_clip.create_model`` under that seed and
checks the result against a SHA-256 of the full table stored in the metadata, so a changed open_clip init fails loudly
instead of loading different weights. ``load_clip`` reads it transparently (same route as any local checkpoint).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Tuple

import torch

from .openclip import get_open_clip, quiet_init

FORMAT = "open_clip state dict, fp16; token_embedding = seeded init + trained rows"
TABLE = "token_embedding.weight"


def seeded_token_embedding(model_name: str, seed: int) -> torch.Tensor:
    """The fp16 token-embedding table ``open_clip.create_model(model_name)`` initializes after ``manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]), quiet_init():
        torch.manual_seed(int(seed))
        model = get_open_clip().create_model(model_name)
    return model.token_embedding.weight.detach().half()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def compact(state: Dict[str, torch.Tensor], model_name: str, seed: int) -> Tuple[Dict[str, torch.Tensor],
                                                                                 Dict[str, str]]:
    """fp16 state dict -> (tensors, metadata) of the compact format; exact: ``read_state`` gives ``state`` back."""
    table = state[TABLE].half()
    init = seeded_token_embedding(model_name, seed)
    ids = (table != init).any(dim=1).nonzero().flatten()
    tensors = {k: v for k, v in state.items() if k != TABLE}
    tensors["token_embedding.rows"] = table[ids].contiguous()
    tensors["token_embedding.ids"] = ids.long().contiguous()
    meta = {"format": FORMAT, "model": model_name, "init_seed": str(int(seed)), "token_embedding_sha256": _digest(table)}
    return tensors, meta


def read_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The full state dict of a safetensors checkpoint (compact ones expanded and verified)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        return state
    table = seeded_token_embedding(meta["model"], int(meta["init_seed"]))
    ids = state.pop("token_embedding.ids")
    table[ids] = state.pop("token_embedding.rows").half()
    if _digest(table) != meta["token_embedding_sha256"]:
        raise ValueError(f"{path}: the token embedding rebuilt from open_clip's seeded init (seed {meta['init_seed']})"
                         " does not match the checkpoint's checksum; this open_clip version initializes "
                         f"{meta['model']} differently; regenerate the checkpoint (pfedmoap-bench pretrain-mini)")
    state[TABLE] = table
    return state
