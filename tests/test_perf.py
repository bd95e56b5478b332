"""Each optimized path equals the naive one it replaces (docs/performance.md); no timing assertions.

References are written here as explicit loops (one image / one prompt at a time) on the tiny random-init CLIP.
"""
import argparse
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from benchmark_suite import perf_naive as nv
from fedml_pfedmoap.algorithms import get_algorithm, list_algorithms
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.simulator import ClientData, Simulator

NAMES = ["airplane", "golden retriever", "sea_urchin", "x"]


@pytest.fixture(scope="module")
def data(tiny_backbone):
    return nv.synthetic_data(tiny_backbone, num_classes=4, num_clients=4, shots=4, test_per_client=5, patches=True)


def _img_ref(backbone, images):
    """One image at a time: uint8 -> [0,1] -> CLIP mean/std -> encode_image."""
    mean = torch.tensor(backbone.image_mean).view(3, 1, 1)
    std = torch.tensor(backbone.image_std).view(3, 1, 1)
    out = [backbone.encode_image(((im.float() / 255.0 - mean) / std)[None], patches=True) for im in images]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def test_cached_features_equal_on_the_fly_encoding(tiny_backbone, data):
    raw = data.test[1]
    cached = nv.encode_all(tiny_backbone, raw, patches=True, batch_size=3)
    ref_f, ref_p = _img_ref(tiny_backbone, raw.images)
    torch.testing.assert_close(cached.feats, ref_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.patches, ref_p, atol=1e-5, rtol=1e-5)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for b_raw, b_fast in zip(raw.batches(2, gen_a), cached.batches(2, gen_b)):  # same shuffles, same batches
        assert torch.equal(b_raw.labels, b_fast.labels)
        torch.testing.assert_close(b_raw.feats, b_fast.feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b_raw.patches, b_fast.patches, atol=1e-5, rtol=1e-5)
    assert raw.subset([4, 0]).labels.tolist() == [raw.labels[4].item(), raw.labels[0].item()]


def test_truncated_text_equals_full_77_tokens_values_and_gradients(tiny_backbone):
    full, trunc = TextEncoder(tiny_backbone, NAMES, truncate=False), TextEncoder(tiny_backbone, NAMES, truncate=True)
    assert full.length == 77 and trunc.length < 30
    ctx = (torch.randn(full.ctx_shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    grads, outs = [], []
    for enc in (full, trunc):
        c = ctx.clone().requires_grad_(True)
        out = enc.features(c)
        (out * torch.arange(out.numel()).view_as(out).float().cos()).sum().backward()
        outs.append(out.detach())
        grads.append(c.grad)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    scale = float(grads[0].abs().max())
    assert scale > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4 * scale, rtol=1e-4)


def test_batched_prompts_equal_one_by_one(tiny_backbone):
    enc = TextEncoder(tiny_backbone, NAMES)
    ctxs = torch.randn(5, *enc.ctx_shape, generator=torch.Generator().manual_seed(1)) * 0.02
    batched = enc.features(ctxs)  # (5, C, D) in one call: several clients' / experts' prompts
    for i in range(5):
        torch.testing.assert_close(batched[i], enc.features(ctxs[i]), atol=1e-5, rtol=1e-5)


def test_never_hit_cache_recomputes():
    cache = nv.NeverHitCache()
    cache["a"] = 1
    assert "a" not in cache and cache.get("a") is None and cache["a"] == 1


def _runtime(backbone, text, naive):
    kw = dict(backbone=backbone, text=text, num_clients=4, seed=0, local_epochs=1, batch_size=2, rounds=3)
    return Runtime(cache=nv.NeverHitCache(), eval_batch_size=2, **kw) if naive else Runtime(**kw)


def _run(backbone, data, name, naive, rounds=2):
    """``rounds`` rounds of ``name``; naive: raw images, 77 tokens, no runtime cache, per-test-batch re-encoding."""
    text = TextEncoder(backbone, data.classnames, truncate=not naive)
    if naive:
        clients = [ClientData(tr, te) for tr, te in zip(data.train, data.test)]
    else:
        clients = [ClientData(nv.encode_all(backbone, tr, True), nv.encode_all(backbone, te, True))
                   for tr, te in zip(data.train, data.test)]
    cls = nv.naive_algorithm(get_algorithm(name)) if naive else get_algorithm(name)
    algo = cls(_runtime(backbone, text, naive), nv.algorithm_params(name, 2))
    sim = Simulator(algo, clients, rounds=rounds, progress=False)
    return algo, sim, sim.run()


ALGOS = [a for a in ["promptfl", "pfedmoap", "fedotp", "zeroshot", "local", "fedprox", "fedpgp", "promptfolio", "fedtpg", "fedpha"]
         if a in list_algorithms()]


@pytest.mark.parametrize("name", ALGOS)
def test_whole_run_naive_equals_optimized(tiny_backbone, data, name):
    """Same metrics every round and the same final per-client state: cached features, truncation, per-round expert
    features and evaluation without re-encoding change nothing beyond float rounding."""
    _, fsim, fres = _run(tiny_backbone, data, name, naive=False)
    _, nsim, nres = _run(tiny_backbone, data, name, naive=True)
    for fr, nr in zip(fres.rounds, nres.rounds):
        assert fr["acc_mean"] == nr["acc_mean"]
        assert fr["test_loss"] == pytest.approx(nr["test_loss"], abs=1e-4)
        if fr["train_loss"] == fr["train_loss"]:  # not NaN (zero-shot does not train)
            assert fr["train_loss"] == pytest.approx(nr["train_loss"], abs=1e-4)
    for cid, st in fsim.states.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(v, nsim.states[cid][k], atol=1e-5, rtol=1e-4)


def test_pfedmoap_expert_features_cached_per_round_equal_reencoding(tiny_backbone, data):
    """Expert text features served from Runtime.cache equal a fresh per-expert encoding (explicit loop)."""
    if "pfedmoap" not in list_algorithms():
        pytest.skip("pfedmoap not registered yet")
    algo, sim, _ = _run(tiny_backbone, data, "pfedmoap", naive=False, rounds=2)
    payload = algo.eval_payload(0)
    assert len(payload["expert_ids"]) == 2
    cached = algo.expert_features(payload)
    assert any(isinstance(k, tuple) and len(k) > 1 for k in algo.rt.cache)  # the cache was used
    again = algo.expert_features(payload)
    assert torch.equal(cached, again)
    full = TextEncoder(tiny_backbone, data.classnames, truncate=False)
    for j, p in enumerate(payload["experts"]):
        ref = F.normalize(full.features(p.float()), dim=-1)
        torch.testing.assert_close(cached[j], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [a for a in ("promptfl", "pfedmoap", "fedotp") if a in list_algorithms()])
def test_scorer_equals_per_batch_reencoding(tiny_backbone, data, name):
    """CoOpModel.scorer (text once per evaluation) == forward per test batch of 2 (text re-encoded every batch)."""
    algo, sim, _ = _run(tiny_backbone, data, name, naive=False, rounds=2)
    model = algo.build_model(algo.eval_payload(1), sim.states[1], train=False)
    model.prepare()
    test = sim.clients[1].test
    with torch.no_grad():
        fast = model.scorer()(next(test.chunks(len(test))))
        slow = torch.cat([model(b) for b in test.chunks(2)])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_within_tolerance_and_fp32_params(tiny_backbone):
    """bf16 autocast around the frozen text tower: features within 5e-2 relative, gradients reach an fp32 ctx."""
    enc = TextEncoder(tiny_backbone, NAMES)
    ctx = (torch.randn(enc.ctx_shape, generator=torch.Generator().manual_seed(2)) * 0.02).requires_grad_(True)
    ref = F.normalize(enc.features(ctx), dim=-1).detach()
    enc.autocast_dtype = torch.bfloat16
    try:
        out = F.normalize(enc.features(ctx).float(), dim=-1)
        out.sum().backward()
    finally:
        enc.autocast_dtype = None
    assert ctx.dtype == torch.float32 and ctx.grad is not None and ctx.grad.dtype == torch.float32
    assert float((out - ref).norm(dim=-1).max()) < 5e-2
    assert torch.equal(F.normalize(enc.features(ctx), dim=-1).detach(), ref)  # off again: exact fp32 path


def test_perf_cli_small_run_reports_equal_logits(tmp_path):
    from benchmark_suite.cli import main

    out = tmp_path / "perf.json"
    algos = ",".join(a for a in ("zeroshot", "promptfl", "pfedmoap") if a in list_algorithms())
    rc = main(["perf", "--scale", "tiny", "--classes", "4", "--clients", "3", "--shots", "2", "--test", "3",
               "--batch", "2", "--experts", "2", "--rounds", "2", "--algorithms", algos, "--threads", "1",
               "--compare-lockstep", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {r["algorithm"]: r for r in res["algorithms"]}
    assert set(rows) == set(algos.split(","))
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["speedup_steady"] > 0 and r["peak_rss_mb"] > 0 and r["acc_equal"]
        if name != "zeroshot":
            assert r["max_abs_dlogit"] <= 1e-4
            assert r["lockstep_clients_per_call"] == 3 and r["lockstep_max_abs_dstate"] <= 1e-5
            assert len(r["lockstep_rounds"]) == 2 and r["speedup_lockstep"] > 0
        else:
            assert "lockstep_rounds" not in r  # nothing is trained
    assert res["text"]["fast"]["seq_len"] < res["text"]["naive"]["seq_len"] == 77
    assert res["text"]["attention"]["uses_sdpa"]


def test_perf_tower_methods_cached_lower_layers_equal_full_towers(tmp_path, tiny_backbone, data):
    """pFedMMA's optimized path (stream after the unchanged visual block, cached) vs the naive one (whole towers per
    step): same batches, same logits, same metrics."""
    from benchmark_suite.cli import main
    from fedml_pfedmoap.clip.towers import visual_stream

    raw = data.test[0].with_stream(1)
    cached = nv.encode_all(tiny_backbone, data.test[0], True, stream_block=1)
    mean = torch.tensor(tiny_backbone.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_backbone.image_std).view(3, 1, 1)
    ref = torch.cat([visual_stream(tiny_backbone, ((im.float() / 255.0 - mean) / std)[None], 1) for im in raw.images])
    torch.testing.assert_close(cached.patches, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(next(raw.subset([2, 0]).chunks(2)).patches, ref[[2, 0]], atol=1e-5, rtol=1e-5)
    out = tmp_path / "perf.json"
    rc = main(["perf", "--scale", "tiny", "--classes", "4", "--clients", "3", "--shots", "2", "--test", "3",
               "--batch", "2", "--rounds", "2", "--algorithms", "pfedmma,fedmgp", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["algorithms"]
    assert [r["algorithm"] for r in rows] == ["pfedmma", "fedmgp"]
    for row in rows:  # FedMGP caches only the ln_pre input tokens (block 0)
        assert "error" not in row, row
        assert row["acc_equal"] and row["max_abs_dlogit"] <= 1e-4 and row["speedup_steady"] > 0


def test_perf_bad_input_names_the_option():
    from benchmark_suite import perf

    p = argparse.ArgumentParser()
    perf.add_arguments(p)
    with pytest.raises(ValueError, match="--modes"):
        perf.Bench(p.parse_args(["--modes", "naive"]))
    with pytest.raises(ValueError, match="--classes"):
        nv.synthetic_data(None, 0, 1, 1, 1)
    assert copy.deepcopy(nv.client_classes(10, 4)) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert nv.client_classes(2, 3) == [[0], [1], [0]]


def test_feature_cache_memory_maps_large_files_with_equal_values(tmp_path, tiny_backbone, digits):
    """Same .npz format; above the size threshold the arrays are memory-mapped, and equal the in-memory load."""
    import numpy as np

    from fedml_pfedmoap.data.transforms import test_transform as eval_transform
    from fedml_pfedmoap.federated.features import FeatureCache, mmap_npz

    fn, desc = eval_transform(32)
    args = (tiny_backbone, digits.fingerprint(), "test", digits.test, fn, desc)
    first = FeatureCache(tmp_path).load_or_encode(*args, patches=True)
    plain = FeatureCache(tmp_path, mmap_min_bytes=None)
    mapped = FeatureCache(tmp_path, mmap_min_bytes=0)
    a, b = plain.load_or_encode(*args, patches=True), mapped.load_or_encode(*args, patches=True)
    assert (plain.hits, plain.mapped, mapped.hits, mapped.mapped) == (1, 0, 1, 1)
    for x, y, z in ((a.feats, b.feats, first.feats), (a.patches, b.patches, first.patches), (a.labels, b.labels,
                                                                                            first.labels)):
        assert torch.equal(x, y) and torch.equal(x, z)
    arrays = mmap_npz(next(tmp_path.glob("*.npz")))
    assert isinstance(arrays["patches"], np.memmap) and arrays["patches"].shape == tuple(a.patches.shape)
    sub = b.subset([3, 1])  # indexing a mapped set reads just those rows
    assert torch.equal(sub.patches, a.patches[[3, 1]])
    np.savez_compressed(tmp_path / "c.npz", x=np.ones(3))
    with pytest.raises(ValueError, match="compressed"):
        mmap_npz(tmp_path / "c.npz")


@pytest.mark.parametrize("name", [a for a in ("promptfl", "local", "pfedmoap") if a in list_algorithms()])
def test_batched_multi_client_eval_text_equals_per_client(tiny_backbone, data, name):
    """Runtime.batch_eval_text (opt-in): same metrics as per-client encoding; PromptFL's identical global prompt is
    encoded once per evaluation round instead of once per client."""
    runs = []
    for batched in (False, True):
        text = TextEncoder(tiny_backbone, data.classnames)
        calls = []
        orig = text.features
        text.features = lambda ctx, _o=orig: (calls.append(tuple(ctx.shape)), _o(ctx))[1]
        clients = [ClientData(nv.encode_all(tiny_backbone, tr, False), nv.encode_all(tiny_backbone, te, False))
                   for tr, te in zip(data.train, data.test)]
        rt = Runtime(backbone=tiny_backbone, text=text, num_clients=4, local_epochs=1, batch_size=2,
                     batch_eval_text=batched)
        sim = Simulator(get_algorithm(name)(rt, nv.algorithm_params(name, 2)), clients, rounds=2, progress=False)
        n_before = len(calls)
        sim.run_round(0)
        runs.append((sim, calls[n_before:]))
        sim.run_round(1)
    (plain, plain_calls), (batched, batched_calls) = runs
    for a, b in zip(plain.result.rounds, batched.result.rounds):
        assert a["acc_mean"] == b["acc_mean"] and a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    single = (1, 16, tiny_backbone.text_width)  # one prompt: a training step or one client's evaluation
    if name == "promptfl":  # 8 training steps + 4 evaluations -> 8 training steps + 1 call for the shared prompt
        assert plain_calls.count(single) == 12 and batched_calls == [single] * 9
    if name == "local":  # 4 distinct prompts -> one call with 4 prompts
        assert (4, 16, tiny_backbone.text_width) in batched_calls


def test_precision_config_is_validated_before_work(quick_cfg):
    from fedml_pfedmoap.config import ConfigError
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.model_args.precision = "fp16"
    with pytest.raises(ConfigError, match="model_args.precision"):
        build_experiment(quick_cfg, "promptfl", progress=False)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile (inductor) needs a C compiler on CPU")
@pytest.mark.timeout(600)
def test_compiled_text_transformer_equals_eager(tiny_backbone):
    """model_args.compile_text (opt-in): inductor-compiled text transformer vs eager, values and prompt gradients.
    Documented tolerance: 1e-5 on features, 1e-4 relative on gradients (fused kernels reorder float sums)."""
    eager, comp = TextEncoder(tiny_backbone, NAMES), TextEncoder(tiny_backbone, NAMES)
    comp.compile_transformer()
    assert not any("_compiled" in n for n, _ in comp.named_modules())  # no duplicated parameters
    ctx = torch.randn(2, *eager.ctx_shape, generator=torch.Generator().manual_seed(1)) * 0.02
    weights = torch.randn(2, len(NAMES), tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    outs, grads = [], []
    for enc in (eager, comp):
        c = ctx.clone().requires_grad_(True)
        out = enc.features(c)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append(c.grad)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4 * float(grads[0].abs().max()), rtol=1e-4)
