"""Frozen CLIP backbones (open_clip) and the CoOp text path."""
from .backbone import ClipBackbone, load_clip
from .prompt import TextEncoder

__all__ = ["ClipBackbone", "load_clip", "TextEncoder"]
