"""Reading CLIP weights users already have, and finding a pretrained tag's weights in the local caches.

``read_weights(path)`` accepts an open_clip state dict (``.pt``/``.pth``/``.bin``, optionally under ``state_dict``),
a ``.safetensors`` file (the packaged compact mini CLIP included), an OpenAI CLIP TorchScript archive (what the
``clip`` package caches as ``ViT-B-16.pt``; read through open_clip's OpenAI loader, keeping only the weights) and a
state dict taken from such an archive (its non-weight entries ``input_resolution``, ``context_length``, ``vocab_size``
are dropped). ``fit_weights`` converts them with open_clip's helpers and loads them strictly. ``cached_tag_file`` finds
the file of a tag such as ``openai`` in the Hugging Face and open_clip caches without touching the network.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from .compact import read_state
from .openclip import get_open_clip

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
FORMATS = ("an open_clip state dict (.pt/.pth/.bin, optionally under 'state_dict'), a .safetensors file, an OpenAI "
           "CLIP TorchScript archive (the clip package's ViT-B-16.pt) or a state dict taken from one")
HF_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".pt", ".bin", ".safetensors", ".pth")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding ``<name>/constants.pkl`` (plain ``torch.save`` zips do not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def read_weights(path: str | Path) -> Tuple[Dict[str, torch.Tensor], bool]:
    """(state dict, whether it is in OpenAI's format: an archive or carrying the archive's non-weight keys)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            return read_state(p), False
        if is_torchscript(p):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_open_clip().load_openai_model(str(p), precision="fp32", device="cpu")
            return dict(model.state_dict()), True
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # text files, foreign pickles, truncated zips: the file is not a checkpoint we read
        reason = " ".join(str(err).split())[:160]
        raise CheckpointError(f"model_args.pretrained: {p} is not a readable checkpoint ({type(err).__name__}: "
                              f"{reason}); expected {FORMATS}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model_args.pretrained: {p} holds no tensor state dict; expected {FORMATS}")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}  # saved from DataParallel
    openai = any(k in state for k in OPENAI_EXTRA_KEYS)
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}, openai


def fit_weights(model: nn.Module, state: Dict[str, torch.Tensor], path: str | Path, name: str) -> None:
    """Convert ``state`` to ``model``'s layout with open_clip's helpers and load it strictly (CheckpointError if not)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    own = model.state_dict()
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in (
        ("missing", [k for k in own if k not in state]),
        ("unexpected", [k for k in state if k not in own]),
        ("of another shape", [k for k in state if k in own and state[k].shape != own[k].shape])) if keys]
    if problems:
        raise CheckpointError(f"model_args.pretrained: the weights in {path} do not fit model_args.model={name!r}: "
                              f"keys {'; '.join(problems)}; pick the model the checkpoint was trained as")
    model.load_state_dict(state, strict=True)


def _hf_cache_hit(repo: str, filenames: List[str]) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache  # an open_clip dependency

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def tag_sources(cfg: Dict[str, str]) -> Tuple[List[Tuple[str, List[str]]], List[Path]]:
    """Where a tag's weights may be cached: (Hugging Face repo, file names) pairs and open_clip download paths."""
    hub: List[Tuple[str, List[str]]] = []
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names the repo's default weights file
        names = [filename] if filename else list(HF_DEFAULT_FILES)
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        hub.append((repo, names))
    urls = [Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])] if cfg.get("url") else []
    return hub, urls


def cached_tag_file(name: str, tag: str) -> Tuple[Optional[str], Dict[str, str], str]:
    """(local file or None, the tag's open_clip config, where was looked) for ``model name`` + ``tag``; no network."""
    oc = get_open_clip()
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    cfg = oc.get_pretrained_cfg(name, tag) or oc.get_pretrained_cfg(base, tag)
    if not cfg:
        tags = oc.list_pretrained_tags_by_model(name) or oc.list_pretrained_tags_by_model(base)
        raise CheckpointError(f"model_args.pretrained={tag!r}: not a pretrained tag of {name!r} (tags: "
                              f"{', '.join(tags) or 'none'}) and not an existing file")
    hub, urls = tag_sources(cfg)
    looked = [f"Hugging Face cache ({repo})" for repo, _ in hub] + [str(u) for u in urls]
    for repo, names in hub:
        hit = _hf_cache_hit(repo, names)
        if hit:
            return hit, cfg, ", ".join(looked)
    for url_file in urls:
        if url_file.is_file():
            return str(url_file), cfg, ", ".join(looked)
    return None, cfg, ", ".join(looked)


def _is_path(value: str) -> bool:
    return Path(value).is_file() or "/" in value or os.sep in value or value.endswith(CHECKPOINT_SUFFIXES)


def resolve_weights(name: str, pretrained: str) -> Tuple[str, Dict[str, Any]]:
    """(local file, the tag's open_clip config or {}) for ``pretrained``: a file path, or a tag found in the local caches
    (downloaded only when the network answers; offline, one error saying how to pass a local file instead)."""
    if _is_path(pretrained):
        if not Path(pretrained).is_file():
            raise CheckpointError(f"model_args.pretrained: checkpoint file {pretrained!r} does not exist")
        return pretrained, {}
    local, cfg, looked = cached_tag_file(name, pretrained)
    if local is None:
        if not network_reachable(cfg):
            raise CheckpointError(
                f"model_args.pretrained={pretrained!r}: the {name} weights are not cached (looked in {looked}) and "
                f"there is no network to download them; pass a local file instead: --set model_args.pretrained="
                f"/path/to/{name}.pt ({FORMATS})")
        local = get_open_clip().download_pretrained(cfg)  # the network answered
    return str(local), dict(cfg)


def network_reachable(cfg: Dict[str, Any], timeout_s: float = 3.0) -> bool:
    """False at once under ``HF_HUB_OFFLINE``; else whether the tag's download host accepts a connection within
    ``timeout_s`` (name lookup included, so an offline machine answers in seconds, not after a 60 s timeout)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else cfg.get("url", "")
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return False
    result: List[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])
