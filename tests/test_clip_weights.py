"""CLIP checkpoints users already have: OpenAI TorchScript archives and their state dicts, bad files, offline tags."""
import time
import warnings

import pytest
import torch

from fedml_pfedmoap.clip.backbone import load_clip
from fedml_pfedmoap.clip.openclip import get_open_clip
from fedml_pfedmoap.clip.weights import cached_tag_file
from fedml_pfedmoap.errors import CheckpointError, ConfigError

OPENAI_EXTRA = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}


@pytest.fixture(scope="module")
def reference():
    """A tiny QuickGELU CLIP whose weights are fp16 values (as OpenAI ships them), seeded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(123)
        model = get_open_clip().create_model("tiny-clip", force_quick_gelu=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
            p.requires_grad_(False)  # frozen like the backbone (same attention kernels)
    return model


def openai_archive(model, path):
    """An OpenAI-style TorchScript archive: traced towers, the mask as a constant, the three non-weight entries."""
    import copy

    m = copy.deepcopy(model)
    del m.context_length, m.vocab_size
    m.attn_mask = m._buffers.pop("attn_mask")  # OpenAI's mask is no state-dict entry
    for key, value in OPENAI_EXTRA.items():
        m.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(m, {"encode_image": (torch.zeros(1, 3, 32, 32),),
                                            "encode_text": (torch.zeros(1, 77, dtype=torch.long),)}, check_trace=False)
    traced.save(str(path))
    return path


def same_outputs(backbone, reference):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        return (torch.equal(backbone.model.encode_image(images), reference.encode_image(images))
                and torch.equal(backbone.model.encode_text(text), reference.encode_text(text)))


def test_openai_torchscript_archive_loads(tmp_path, reference):
    path = openai_archive(reference, tmp_path / "ViT-tiny.pt")
    with pytest.raises(RuntimeError, match="weights_only"):  # what a plain torch.load does with it
        torch.load(path, weights_only=True)
    backbone = load_clip("tiny-clip", str(path))  # plain name: OpenAI weights bring QuickGELU
    assert same_outputs(backbone, reference)


def test_openai_state_dict_with_non_weight_keys_loads(tmp_path, reference):
    state = {k: v.half() for k, v in reference.state_dict().items()}
    state.update({k: torch.tensor(v) for k, v in OPENAI_EXTRA.items()})
    torch.save(state, tmp_path / "openai_state.pt")
    backbone = load_clip("tiny-clip", str(tmp_path / "openai_state.pt"))
    assert same_outputs(backbone, reference)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    assert same_outputs(load_clip("tiny-clip", str(tmp_path / "wrapped.pt")), reference)


def test_text_file_as_checkpoint_names_file_and_formats(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_text("epoch 3: accuracy 0.91\n")
    with pytest.raises(CheckpointError, match=rf"{bad} is not a readable checkpoint .*expected an open_clip state "
                                              r"dict .*OpenAI CLIP TorchScript archive"):
        load_clip("tiny-clip", str(bad))


def test_weights_of_another_model_are_named(tmp_path, reference):
    torch.save(reference.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"tiny.pt do not fit model_args.model='mini-clip'"):
        load_clip("mini-clip", str(tmp_path / "tiny.pt"))


def test_uncached_tag_offline_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(get_open_clip(), "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        load_clip("ViT-B-16", "openai")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and "not cached" in msg and str(tmp_path / ".cache" / "clip" / "ViT-B-16.pt") in msg
    assert "--set model_args.pretrained=/path/to/ViT-B-16.pt" in msg


def test_cached_tag_found_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert cached_tag_file("ViT-B-16", "openai")[0] is None
    clip_cache = tmp_path / ".cache" / "clip" / "ViT-B-16.pt"  # where the clip package and open_clip's URL path put it
    clip_cache.parent.mkdir(parents=True)
    clip_cache.write_bytes(b"x")
    assert cached_tag_file("ViT-B-16", "openai")[0] == str(clip_cache)
    clip_cache.unlink()
    snap = tmp_path / "hf" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    assert cached_tag_file("ViT-B-16", "openai")[0] == str(snap / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match="not a pretrained tag of 'ViT-B-16' .*openai"):
        cached_tag_file("ViT-B-16", "openia")


@pytest.mark.parametrize("name,expected", [("mini-clp", "mini-clip"), ("vit-b-16-quickgelu", "ViT-B-16-quickgelu"),
                                           ("tiny_clip", "tiny-clip")])
def test_unknown_model_suggests_closest_accepted_names(name, expected):
    with pytest.raises(ConfigError, match=rf"unknown model '{name}'; closest accepted names: {expected}[,;]"):
        load_clip(name)
    with pytest.raises(ConfigError, match=r"all \d+ accepted names are printed by: python -c"):
        load_clip(name)
