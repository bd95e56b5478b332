"""DP against the server (docs/privacy.md): the noise comes from a per-client secret that nothing the server or the
tracking store holds regenerates; the noise is N(0, σ²) per coordinate; resume keeps the secret and the noise."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.seeding import derive_seed, make_generator
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import FeatureSet
from fedml_pfedmoap.federated.simulator import ClientData, Simulator

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DP = {"epsilon": 50, "delta": 0.05, "clip_grad": 1.0, "clip_update": 0.01, "accounting": "release"}


@pytest.fixture(scope="module")
def rt(tiny_backbone):
    text = TextEncoder(tiny_backbone, NAMES, n_ctx=16)
    return Runtime(backbone=tiny_backbone, text=text, num_clients=4, seed=0, local_epochs=1, batch_size=8, rounds=4)


def data(cid, n=16):
    g = torch.Generator().manual_seed(300 + cid)
    return FeatureSet(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def one_upload(rt, dp, cid=1, round_idx=2):
    a = get_algorithm("promptfl")(rt, {"dp": dp})
    a.init_server()
    a.begin_round(round_idx, [cid])
    payload = a.client_payload(cid)
    state = {}
    return a.local_train(payload, state, data(cid)), payload, state


def server_guesses(rt, upload, payload, sigma, cid, round_idx):
    """Every reconstruction of the clean upload the server can form from the config, the seeds, the download and
    the upload: replaying seed-derived generators (the old scheme and variants), the upload itself, and its
    projection onto the clip ball around the global prompt it sent."""
    noisy, ref = upload["prompt"], payload["global_prompt"]
    seeds = [rt.seed, 0, 1, 42]
    gens = [make_generator(s, "dp-noise", cid, round_idx) for s in seeds]
    gens += [make_generator(s, tag, cid, round_idx) for s in seeds for tag in ("noise", "dp", "upload")]
    gens += [torch.Generator().manual_seed(s) for s in seeds + [derive_seed(rt.seed, cid, round_idx)]]
    guesses = {f"replay{i}": noisy - sigma * torch.randn(noisy.shape, generator=g) for i, g in enumerate(gens)}
    guesses["numpy"] = noisy - sigma * torch.from_numpy(
        np.random.default_rng(rt.seed).standard_normal(tuple(noisy.shape))).float()
    guesses["upload"] = noisy.clone()
    step = noisy - ref
    guesses["projection"] = ref + step * min(1.0, DP["clip_update"] / float(step.norm()))
    return guesses


def test_server_cannot_reconstruct_the_clean_update(rt):
    cid, round_idx = 1, 2
    noisy, payload, state = one_upload(rt, DP, cid, round_idx)
    clean, _, _ = one_upload(rt, {**DP, "epsilon": math.inf}, cid, round_idx)  # same training, no noise
    sigma = noisy["metrics"]["dp_sigma"]
    assert sigma > 0
    true_update = clean["prompt"] - payload["global_prompt"]
    assert 0 < float(true_update.norm()) <= DP["clip_update"] * (1 + 1e-5)
    for name, guess in server_guesses(rt, noisy, payload, sigma, cid, round_idx).items():
        err = guess - clean["prompt"]
        rel = float(err.norm() / true_update.norm())
        assert rel > 0.5, (name, rel)  # the old seed-derived noise was recovered to ~2e-6
        if name.startswith("replay") or name in ("numpy", "upload"):
            assert float(err.pow(2).mean().sqrt()) > 0.5 * sigma, name  # off by about σ per coordinate
    assert len(state["dp_secret"]) == 64  # a 256-bit secret, kept by the client


def test_secret_is_nowhere_the_server_or_the_tracking_store_looks(rt):
    clients = [ClientData(data(c), data(c + 10, 8)) for c in range(4)]
    sim = Simulator(get_algorithm("promptfl")(rt, {"dp": DP}), clients, rounds=2, frac=0.5, seed=0, progress=False)
    uploads = []
    original = sim.algo.aggregate
    sim.algo.aggregate = lambda ups: (uploads.extend(ups), original(ups))
    sim.run()
    secrets = [st["dp_secret"] for st in sim.states.values() if "dp_secret" in st]
    assert len(secrets) >= 2 and len(set(secrets)) == len(secrets)  # one per client that released
    held = repr([uploads, sim.result.rounds, sim.result.summary, sim.algo.server_state(), sim.algo.hp, rt.seed])
    for s in secrets:
        assert s not in held and str(int(s, 16)) not in held
    for u in uploads:
        assert not set(u["metrics"]) & {"train_loss", "update_norm", "dp_update_clipped"}


def test_same_seed_and_config_give_fresh_noise(rt):
    """Two runs with the same train seed no longer reuse one noise vector (the old scheme did)."""
    a, payload, _ = one_upload(rt, DP)
    b, _, _ = one_upload(rt, DP)
    diff = a["prompt"] - b["prompt"]
    assert float(diff.pow(2).mean().sqrt()) > 0.5 * math.sqrt(2) * a["metrics"]["dp_sigma"]  # ~2e-8 chance of a miss


def test_noise_is_gaussian_with_the_stated_sigma():
    """Through the mechanism, with a fixed secret: upload − clip(update) ~ N(0, σ²) i.i.d. (KS test on 200k draws);
    other rounds and other secrets give uncorrelated draws."""
    from fedml_pfedmoap.privacy import DPConfig, GaussianUploadMechanism

    mech = GaussianUploadMechanism(DPConfig.parse(DP), lr=0.002, momentum=0.9, rounds=None)
    sigma = mech.sigma(steps=10)
    assert sigma == pytest.approx(2 * 0.01 / math.sqrt(2 * (math.sqrt(50 + math.log(20)) - math.sqrt(math.log(20)))
                                                       ** 2), rel=1e-12)
    ref = torch.zeros(200_000)
    trained = torch.full((200_000,), 1e-6)  # ‖Δ‖ = 4.5e-4 < C_up: not clipped
    secret = "a1" * 32
    out, norm = mech.privatize(trained, ref, 10, secret, "upload", 3)
    z = ((out - trained) / sigma).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.std() - 1) < 4 / math.sqrt(2 * z.size)
    again, _ = mech.privatize(trained, ref, 10, secret, "upload", 3)
    assert torch.equal(out, again)  # a function of (secret, context): resume redraws the same noise
    for other in ((secret, "upload", 4), ("b2" * 32, "upload", 3)):
        w = ((mech.privatize(trained, ref, 10, *other)[0] - trained) / sigma).double().numpy()
        assert abs(np.corrcoef(z, w)[0, 1]) < 4 / math.sqrt(z.size)


def test_checkpoint_resume_keeps_the_secret_and_the_noise(rt, monkeypatch):
    """Snapshot after round 1, restore in a fresh simulator, continue: the per-round metrics, uploads and states
    equal an uninterrupted run's. Secrets come from a test stream continued across the 'crash', so a secret lost
    by the checkpoint would be redrawn differently and the runs would differ."""
    import fedml_pfedmoap.privacy.noise as noise
    from fedml_pfedmoap.checkpoint import from_plain, restore, snapshot, to_plain

    clients = [ClientData(data(c), data(c + 10, 8)) for c in range(4)]

    def simulator(stream):
        monkeypatch.setattr(noise, "new_secret", lambda: f"{next(stream):064x}")
        return Simulator(get_algorithm("promptfl")(rt, {"dp": DP}), clients, rounds=4, frac=0.5, seed=0,
                         progress=False)

    full = simulator(itertools.count(1_000_003, 7919))
    ref = full.run()
    stream = itertools.count(1_000_003, 7919)
    first, saved = simulator(stream), {}

    def stop_after_round_1(m, sim):
        if m["round"] == 1:
            saved["ck"] = from_plain(to_plain(snapshot(sim, "h")))
            raise KeyboardInterrupt

    first.on_round = stop_after_round_1
    with pytest.raises(KeyboardInterrupt):
        first.run()
    second = simulator(stream)
    restore(second, saved["ck"])
    got = second.run()
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    for a, b in zip(ref.rounds, got.rounds, strict=True):
        keys = [k for k in a if not k.startswith(("time_", "round_time", "peak_", "cuda_"))]
        assert keys == [k for k in b if not k.startswith(("time_", "round_time", "peak_", "cuda_"))]
        assert all(same(a[k], b[k]) for k in keys), [k for k in keys if not same(a[k], b[k])]
    assert got.summary == ref.summary and "dp_epsilon_run_pld" in got.summary
    assert torch.equal(full.algo.global_prompt, second.algo.global_prompt)
    assert {c: s.get("dp_secret") for c, s in full.states.items()} == \
        {c: s.get("dp_secret") for c, s in second.states.items()}
