"""Loading a frozen open_clip model and encoding images (pooled feature and projected patch tokens).

``load_clip(name, pretrained)`` accepts any open_clip model name (``open_clip.list_models()``) plus the configs shipped in
``fedml_pfedmoap/model_configs`` (``tiny-clip``, random init, for tests). ``pretrained`` is ``None`` (random init), an
open_clip tag such as ``openai`` (downloads; needs internet) or a local checkpoint path (state dict, ``.safetensors``
or ``{"state_dict": ...}``). The model is frozen and kept in eval mode (PFEDMOAP.md §3).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_REGISTERED = False


def _open_clip():
    global _REGISTERED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip
    if not _REGISTERED:
        open_clip.add_model_config(CONFIG_DIR)
        _REGISTERED = True
    return open_clip


def list_models() -> list[str]:
    return list(_open_clip().list_models())


class ClipBackbone(nn.Module):
    """A frozen CLIP: ``encode_image`` (pooled, optionally patch tokens) plus the text-tower parts CoOp needs."""

    def __init__(self, model: nn.Module, name: str, pretrained: Optional[str]) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.pretrained = pretrained
        vis = model.visual
        size = getattr(vis, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(getattr(vis, "output_dim"))
        self.text_width = int(model.token_embedding.weight.shape[1])
        self.image_mean = tuple(getattr(vis, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = tuple(getattr(vis, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))

    def train(self, mode: bool = True) -> "ClipBackbone":  # frozen: always eval (RN50 BN stats never update)
        return super().train(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        """s = exp(logit_scale), read from the model (100 for OpenAI weights)."""
        return self.model.logit_scale.detach().exp()

    @property
    def identity(self) -> str:
        """What identifies the image tower's outputs: name plus the checkpoint (tag, or path + size + mtime)."""
        pre = self.pretrained
        if pre and Path(pre).is_file():
            st = Path(pre).stat()
            pre = f"{Path(pre).resolve()}:{st.st_size}:{int(st.st_mtime)}"
        if not pre:
            # random init: identify by a checksum of the visual weights (deterministic only for a seeded init)
            with torch.no_grad():
                pre = "random:" + "%.8e" % float(sum(p.double().sum() for p in self.model.visual.parameters()))
        return f"{self.name}|{pre}"

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, patches: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pooled image features (B,D), unnormalized, and if ``patches`` the projected patch tokens (B,M,D)."""
        vis = self.model.visual
        if not patches:
            return self.model.encode_image(images), None
        if hasattr(vis, "proj") and hasattr(vis, "output_tokens"):  # open_clip VisionTransformer
            prev = vis.output_tokens
            vis.output_tokens = True
            try:
                pooled, tokens = vis(images)
            finally:
                vis.output_tokens = prev
            proj = vis.proj
            tokens = tokens @ proj if proj is not None else tokens  # tokens come after ln_post, unprojected
            return pooled, tokens
        raise NotImplementedError(
            f"patch tokens are implemented for open_clip VisionTransformer towers; {type(vis).__name__} is not supported"
        )


def load_clip(name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu",
              force_quick_gelu: bool = False) -> ClipBackbone:
    """Build a frozen open_clip model by name with random init, a pretrained tag or a local checkpoint path."""
    oc = _open_clip()
    valid = oc.list_models()
    if name not in valid:
        raise ValueError(f"unknown model {name!r} (model_args.model); valid open_clip names include: "
                         f"{', '.join(sorted(valid)[:40])}, ... (see open_clip.list_models())")
    if pretrained in ("", "none", "None"):
        pretrained = None
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth"))):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"model_args.pretrained: checkpoint file {pretrained!r} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = oc.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=force_quick_gelu)
    logger.info("loaded %s (pretrained=%s)", name, pretrained)
    return ClipBackbone(model, name, pretrained).to(device)
