"""Training augmentation feature paths (docs/data.md): ``online`` and ``bank:M`` (federated/augment.py)."""
import copy

import numpy as np
import pytest
import torch

from fedml_pfedmoap.data.base import ArraySplit, ImageDataset
from fedml_pfedmoap.data import transforms as T
from fedml_pfedmoap.federated.augment import BankFeatureSet, OnlineFeatureSet, bank_views
from fedml_pfedmoap.federated.features import FeatureCache, FeatureSet, encode_split


@pytest.fixture(scope="module")
def tiny_ds():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (12, 40, 48, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    split = ArraySplit(imgs, labels, "aug")
    return ImageDataset("aug", ["a", "b", "c"], split, split)


def _clean(backbone, ds):
    fn, _ = T.test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    arrays = encode_split(backbone, ds.train, fn)
    return FeatureSet(torch.from_numpy(arrays["feats"]), torch.from_numpy(arrays["labels"]))


def test_parse_augment_and_cache_descriptions():
    assert T.parse_augment("none") == ("none", 0) and T.parse_augment("bank:4") == ("bank", 4)
    for bad in ("bank:0", "bank:x", "random"):
        with pytest.raises(ValueError, match="none \\| online \\| bank:M"):
            T.parse_augment(bad)
    descs = {T.train_transform(m, 32)[1] for m in ("none", "online", "bank:2", "bank:3")}
    assert len(descs) == 4  # every mode has its own feature-cache key


def test_online_batches_match_explicit_encoding(tiny_backbone, tiny_ds):
    bb = tiny_backbone
    aug = T.augment_transform(bb.image_size, bb.image_mean, bb.image_std)
    fs = OnlineFeatureSet(_clean(bb, tiny_ds), tiny_ds.train, torch.arange(12), bb, aug, False, "cpu").subset(
        [1, 4, 5, 7, 8, 11, 2])
    state = torch.random.get_rng_state()
    got = list(fs.batches(3, torch.Generator().manual_seed(5)))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    # explicit reference: same permutation and per-batch seeds from the generator, crops under that seed
    g = torch.Generator().manual_seed(5)
    items = [1, 4, 5, 7, 8, 11, 2]
    order = torch.randperm(7, generator=g)
    assert len(got) == 2  # drop_last: 7 items -> two full batches of 3
    for b, s in enumerate((0, 3)):
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        pos = order[s:s + 3].tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            imgs = [aug(tiny_ds.train.image(items[p])) for p in pos]
        want, _ = bb.encode_image(torch.stack(imgs))
        assert torch.allclose(got[b].feats, want.float(), atol=1e-6)
        assert got[b].labels.tolist() == [int(tiny_ds.train.labels[items[p]]) for p in pos]
        clean = fs.feats[torch.tensor(pos)]
        assert not torch.allclose(got[b].feats, clean, atol=1e-4)  # augmentation actually applied
    again = list(fs.batches(3, torch.Generator().manual_seed(5)))
    assert all(torch.equal(a.feats, b.feats) for a, b in zip(got, again))


def test_online_worker_processes_give_identical_batches(tiny_backbone, tiny_ds):
    """data_args.num_workers: decoding/augmentation in DataLoader workers is bit-identical to the in-process path."""
    bb = tiny_backbone
    aug = T.augment_transform(bb.image_size, bb.image_mean, bb.image_std)
    base = OnlineFeatureSet(_clean(bb, tiny_ds), tiny_ds.train, torch.arange(12), bb, aug, False, "cpu")
    runs = []
    for workers in (0, 2):
        fs = OnlineFeatureSet(base, tiny_ds.train, torch.arange(12), bb, aug, False, "cpu", num_workers=workers)
        fs = fs.subset([0, 2, 3, 5, 6, 7, 9, 10, 11])
        assert fs.num_workers == workers  # kept through subset
        runs.append([(b.feats, b.labels) for b in fs.batches(2, torch.Generator().manual_seed(7))])
    assert len(runs[0]) == len(runs[1]) == 4
    for (fa, la), (fb, lb) in zip(*runs):
        assert torch.equal(la, lb) and torch.equal(fa, fb)


def test_bank_views_and_batches(tiny_backbone, tiny_ds, tmp_path):
    bb = tiny_backbone
    aug, desc = T.train_transform("bank:3", bb.image_size, bb.image_mean, bb.image_std)
    cache = FeatureCache(tmp_path)
    views, vp = bank_views(cache, bb, tiny_ds, aug, desc, 3, False, "cpu", seed=1)
    assert views.shape == (3, 12, bb.embed_dim) and vp is None
    assert not torch.allclose(views[0], views[1])  # distinct views
    views2, _ = bank_views(FeatureCache(tmp_path), bb, tiny_ds, aug, desc, 3, False, "cpu", seed=1)
    assert torch.equal(views, views2) and len(list(tmp_path.glob("*.npz"))) == 3  # cached, one file per view
    fs = BankFeatureSet(_clean(bb, tiny_ds), views).subset([0, 3, 6, 9, 10])
    got = list(fs.batches(2, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(5, generator=g)
    sub = [0, 3, 6, 9, 10]
    for b, s in enumerate((0, 2)):
        pos = order[s:s + 2].tolist()
        pick = torch.randint(0, 3, (2,), generator=g).tolist()
        for r, (p, m) in enumerate(zip(pos, pick)):
            assert torch.equal(got[b].feats[r], views[m, sub[p]])
            assert int(got[b].labels[r]) == int(tiny_ds.train.labels[sub[p]])


@pytest.mark.parametrize("mode", ["online", "bank:2"])
def test_experiment_trains_with_augmentation(quick_cfg, mode):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.data_args.train_augment = mode
    quick_cfg.train_args.comm_round = 1
    quick_cfg.data_args.shots = 2
    exp = build_experiment(quick_cfg, "promptfl", progress=False)
    cls = OnlineFeatureSet if mode == "online" else BankFeatureSet
    assert all(isinstance(c.train, cls) for c in exp.simulator.clients)
    result = exp.simulator.run()
    assert np.isfinite(result.rounds[-1]["train_loss"]) and 0.0 <= result.summary["acc_last"] <= 1.0


def test_num_workers_is_validated(quick_cfg):
    from fedml_pfedmoap.config import ConfigError
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.data_args.num_workers = -1
    with pytest.raises(ConfigError, match="data_args.num_workers"):
        build_experiment(quick_cfg, "promptfl", progress=False)


def test_cifar_legacy_transform_wired_into_features(tmp_path, tiny_backbone, quick_cfg):
    """data_args.cifar_transform: legacy (D11 parity): both splits are encoded after to-tensor -> CIFAR mean/std ->
    resize of the normalized tensor; the default (clip) features differ and have their own cache key."""
    import fixtures_data as FD
    import torch.nn.functional as Fn
    from fedml_pfedmoap.config import ConfigError, check_cifar_transform
    from fedml_pfedmoap.experiment import Resources, build_experiment

    FD.make_cifar(tmp_path / "data", "cifar10")
    quick_cfg.data_args.dataset, quick_cfg.data_args.data_root = "cifar10", str(tmp_path / "data")
    quick_cfg.data_args.cifar_transform = "legacy"
    check_cifar_transform(quick_cfg)
    res = Resources()
    ds = res.dataset(quick_cfg)
    got = res.split_features(quick_cfg, tiny_backbone, ds, "test", False, torch.device("cpu"))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    size = tiny_backbone.image_size
    ref = []
    for i in range(len(ds.test)):
        x = torch.from_numpy(np.asarray(ds.test.image(i))).permute(2, 0, 1).float() / 255.0
        x = Fn.interpolate(((x - mean) / std)[None], size=(size, size), mode="bilinear", antialias=True,
                           align_corners=False)
        ref.append(tiny_backbone.encode_image(x)[0])
    torch.testing.assert_close(got.feats, torch.cat(ref).float(), atol=1e-5, rtol=1e-5)
    quick_cfg.data_args.cifar_transform = "clip"
    clip = res.split_features(quick_cfg, tiny_backbone, ds, "test", False, torch.device("cpu"))
    assert not torch.allclose(clip.feats, got.feats, atol=1e-3)
    for bad in ({"cifar_transform": "cifar"}, {"cifar_transform": "legacy", "dataset": "digits"},
                {"cifar_transform": "legacy", "train_augment": "online"}):
        cfg = copy.deepcopy(quick_cfg)
        for k, v in bad.items():
            setattr(cfg.data_args, k, v)
        with pytest.raises(ConfigError, match="data_args.cifar_transform"):
            build_experiment(cfg, "promptfl", progress=False)
