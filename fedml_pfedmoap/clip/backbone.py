"""Loading a frozen open_clip model and encoding images (pooled feature and projected patch tokens).

``load_clip(name, pretrained)`` accepts any open_clip model name (``open_clip.list_models()``) plus the configs shipped in
``fedml_pfedmoap/model_configs`` (``tiny-clip``, random init, for tests; ``mini-clip``). ``pretrained`` is ``None``
(random init), an open_clip tag such as ``openai`` (read from the Hugging Face / open_clip caches; downloaded only when
the network answers) or a local checkpoint file in any format ``clip/weights.py`` reads (open_clip state dict,
``.safetensors``, OpenAI TorchScript archive or its state dict). The model is frozen and kept in eval mode
(docs/algorithms.md §Shared setting).
"""
from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from ..data.transforms import CLIP_MEAN, CLIP_STD
from ..errors import ConfigError
from ..fileio import file_hexdigest
from .openclip import get_open_clip, quiet_init
from .weights import fit_weights, read_weights, resolve_weights

logger = logging.getLogger(__name__)


def with_autocast(fn):
    """Run a frozen-tower method under ``torch.autocast(dtype=self.autocast_dtype)`` (bf16 frozen towers with fp32
    trainable parameters, docs/algorithms.md); a no-op when ``autocast_dtype`` is None (the default, exact fp32)."""

    @functools.wraps(fn)
    def wrapper(self, x: torch.Tensor, *args, **kwargs):
        dtype = self.autocast_dtype
        if dtype is None:
            return fn(self, x, *args, **kwargs)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return fn(self, x, *args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_hexdigest(path)[:24]


def file_digest(path: str | Path) -> str:
    """SHA-256 prefix of a checkpoint file's bytes (memoized per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _digest(str(p), st.st_size, st.st_mtime_ns)


def list_models() -> list[str]:
    """Every model name ``load_clip`` accepts: open_clip's plus the packaged ``model_configs``."""
    return list(get_open_clip().list_models())


class ClipBackbone(nn.Module):
    """A frozen CLIP: ``encode_image`` (pooled, optionally patch tokens) plus the text-tower parts CoOp needs."""

    autocast_dtype: Optional[torch.dtype] = None  # model_args.precision: bf16 -> torch.bfloat16 around encode_image

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
        self.image_mean = tuple(getattr(vis, "image_mean", None) or CLIP_MEAN)
        self.image_std = tuple(getattr(vis, "image_std", None) or CLIP_STD)

    def train(self, mode: bool = True) -> "ClipBackbone":  # frozen: always eval (RN50 BN stats never update)
        return super().train(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        """s = exp(logit_scale), read from the model (100 for OpenAI weights)."""
        return self.model.logit_scale.detach().exp()

    @property
    def identity(self) -> str:
        """What identifies the image tower's outputs: name plus the checkpoint (tag, or a content hash of the file)."""
        pre = self.pretrained
        if pre and Path(pre).is_file():
            pre = "sha256:" + file_digest(pre)  # content, not path/mtime: a fresh checkout reuses feature caches
        if not pre:
            # random init: identify by a checksum of the visual weights (deterministic only for a seeded init)
            with torch.no_grad():
                pre = "random:" + "%.8e" % float(sum(p.double().sum() for p in self.model.visual.parameters()))
        if self.autocast_dtype is not None:  # reduced-precision features are cached under their own key
            pre = f"{pre}|autocast:{str(self.autocast_dtype).replace('torch.', '')}"
        return f"{self.name}|{pre}"

    @torch.no_grad()
    @with_autocast
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
        if hasattr(vis, "attnpool") and hasattr(vis, "stem"):  # open_clip ModifiedResNet (RN50, ...)
            x = vis.stem(images)
            for layer in (vis.layer1, vis.layer2, vis.layer3, vis.layer4):
                x = layer(x)
            out = attention_pool_all_queries(vis.attnpool, x)
            return out[:, 0], out[:, 1:]  # the mean-token query is the stock pooled feature
        raise NotImplementedError(
            f"patch tokens are implemented for open_clip VisionTransformer and ModifiedResNet towers; "
            f"{type(vis).__name__} is not supported"
        )


def attention_pool_all_queries(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's ResNet attention pool with **all** 1+H·W positions as queries (FedOTP's RN50 local features).

    ``x`` is the last feature map (B,C,H,W); returns (B, 1+H·W, D): position 0 (the mean-token query) equals the
    stock pooled output, positions 1.. are the M = H·W projected patch features (docs/algorithms.md §FedOTP).
    """
    x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = nn.functional.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out.permute(1, 0, 2)


def check_model_name(name: str) -> None:
    """A ``ConfigError`` for a name that is neither an open_clip model nor one of ``model_configs``: the closest
    accepted names and how to list them all."""
    valid = list_models()
    if name in valid:
        return
    by_lower = {v.lower(): v for v in valid}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=8, cutoff=0.4)]
    hint = f"closest accepted names: {', '.join(close)}; " if close else ""
    raise ConfigError(f"model_args.model: unknown model {name!r}; {hint}all {len(valid)} accepted names are printed "
                      "by: python -c \"from fedml_pfedmoap.clip.backbone import list_models; print(list_models())\"")


def load_clip(name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu",
              force_quick_gelu: bool = False) -> ClipBackbone:
    """Build a frozen open_clip model by name with random init, a pretrained tag or a local checkpoint file.

    A file may be in any format ``clip/weights.py`` reads; OpenAI-format files (and tags whose open_clip config says
    so) get QuickGELU, the activation OpenAI trained with.
    """
    check_model_name(name)
    if pretrained in ("", "none", "None"):
        pretrained = None
    state, tag_cfg, path = None, {}, None
    if pretrained:
        path, tag_cfg = resolve_weights(name, pretrained)
        state, openai = read_weights(path)
        if (openai or tag_cfg.get("quick_gelu")) and not force_quick_gelu:
            logger.info("%s: OpenAI-trained weights, so the model uses QuickGELU", path)
            force_quick_gelu = True
    with quiet_init():
        model = get_open_clip().create_model(name, pretrained=None, device="cpu", force_quick_gelu=force_quick_gelu)
    if state is not None:
        fit_weights(model, state, path, name)
        if tag_cfg.get("mean") and tag_cfg.get("std"):
            model.visual.image_mean, model.visual.image_std = tuple(tag_cfg["mean"]), tuple(tag_cfg["std"])
    logger.info("loaded %s (pretrained=%s)", name, pretrained)
    return ClipBackbone(model, name, pretrained).to(device)
