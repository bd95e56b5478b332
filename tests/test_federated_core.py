"""FedAvg weighting, client sampling, per-client state, feature cache, metrics, and a learning sanity check."""
import numpy as np
import pytest
import torch

from fedml_pfedmoap.algorithms.promptfl import fedavg
from fedml_pfedmoap.algorithms.protocol import Algorithm, EvalResult
from fedml_pfedmoap.data.transforms import test_transform as eval_transform
from fedml_pfedmoap.federated.features import FeatureCache, FeatureSet
from fedml_pfedmoap.federated.metrics import client_summary, run_summary
from fedml_pfedmoap.federated.schedule import payload_bytes, sample_clients
from fedml_pfedmoap.federated.simulator import ClientData, Simulator


def test_fedavg_weights_by_sample_count():
    a, b, c = torch.full((2, 3), 1.0), torch.full((2, 3), 4.0), torch.full((2, 3), -2.0)
    out = fedavg([a, b, c], [10, 30, 60])
    expected = (10 * 1.0 + 30 * 4.0 + 60 * -2.0) / 100
    assert torch.allclose(out, torch.full((2, 3), expected))
    with pytest.raises(ValueError):
        fedavg([], [])


def test_client_sampling_is_deterministic_per_seed_and_round():
    s1 = [sample_clients(100, 0.1, seed=3, round_idx=t) for t in range(5)]
    s2 = [sample_clients(100, 0.1, seed=3, round_idx=t) for t in range(5)]
    s3 = [sample_clients(100, 0.1, seed=4, round_idx=t) for t in range(5)]
    assert s1 == s2 and s1 != s3
    assert all(len(s) == 10 and len(set(s)) == 10 for s in s1)
    assert len({tuple(s) for s in s1}) > 1  # rounds differ (unlike FedML's repeated round-0 sample)
    assert sample_clients(10, 1.0, 0, 0) == list(range(10))


class Counter(Algorithm):
    """A probe algorithm: each client counts its own participations; the server records payload ids."""

    name = "counter"

    def init_server(self):
        super().init_server()
        self.seen = []

    def client_payload(self, cid):
        return {"client_index": cid, "round": self.round, "tag": torch.tensor([float(cid)])}

    def init_client_state(self, cid):
        return {"count": 0}

    def local_train(self, payload, state, data):
        state["count"] += 1
        return {"client_index": payload["client_index"], "n": len(data), "prompt": torch.zeros(4)}

    def aggregate(self, uploads):
        self.seen.append(sorted(u["client_index"] for u in uploads))

    def evaluate(self, payload, state, data):
        return EvalResult(state.get("count", 0), 10, 0.0)


def _toy_clients(n):
    fs = FeatureSet(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    return [ClientData(fs, fs) for _ in range(n)]


def test_simulator_keeps_per_client_state_across_rounds():
    algo = Counter.__new__(Counter)
    Algorithm.__init__(algo, runtime=None, params={})
    sim = Simulator(algo, _toy_clients(6), rounds=4, frac=0.5, seed=1, progress=False)
    res = sim.run()
    expected = {i: sum(i in s for s in algo.seen) for i in range(6)}
    assert {i: sim.states[i]["count"] for i in range(6)} == expected
    # evaluation sees every client's own state: acc = count/10 per client, averaged unweighted
    assert res.rounds[-1]["acc_mean"] == pytest.approx(np.mean([expected[i] / 10 for i in range(6)]))
    assert res.rounds[0]["bytes_down"] == 4 and res.rounds[0]["bytes_up"] == 16  # one fp32 scalar down, 4 up


def test_payload_bytes_counts_tensors_only():
    assert payload_bytes({"a": torch.zeros(3, 2), "b": [torch.zeros(5, dtype=torch.float16)], "i": 7}) == 24 + 10


def test_metrics_summaries():
    s = client_summary([0.2, 0.4, 1.0, 0.6], [10, 10, 20, 60])
    assert s["acc_mean"] == pytest.approx(0.55)
    assert s["acc_weighted"] == pytest.approx((2 + 4 + 20 + 36) / 100)
    assert s["acc_bottom10"] == pytest.approx(0.2)
    assert s["acc_std"] == pytest.approx(np.std([0.2, 0.4, 1.0, 0.6]))
    r = run_summary([0.1, 0.5, 0.3, 0.2, 0.4, 0.6, 0.35])
    assert r["acc_last"] == 0.35 and r["acc_best"] == 0.6
    assert r["acc_last5"] == pytest.approx(np.mean([0.3, 0.2, 0.4, 0.6, 0.35]))


def test_feature_cache_hit_miss_and_invalidation(tmp_path, tiny_backbone, digits):
    from fedml_pfedmoap.clip import load_clip

    cache = FeatureCache(tmp_path)
    fn, desc = eval_transform(32)
    fp = digits.fingerprint()
    a = cache.load_or_encode(tiny_backbone, fp, "test", digits.test, fn, desc)
    assert (cache.hits, cache.misses) == (0, 1)
    b = cache.load_or_encode(tiny_backbone, fp, "test", digits.test, fn, desc)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(a.feats, b.feats) and torch.equal(a.labels, torch.as_tensor(digits.test.labels))
    # the cached features equal on-the-fly encoding
    imgs = torch.stack([fn(digits.test.image(i)) for i in range(5)])
    torch.testing.assert_close(a.feats[:5], tiny_backbone.encode_image(imgs)[0], atol=1e-5, rtol=1e-5)
    fn2, desc2 = eval_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    c = cache.load_or_encode(tiny_backbone, fp, "test", digits.test, fn2, desc2)
    assert cache.misses == 2 and not torch.equal(a.feats, c.feats)  # changed transform -> new entry
    torch.manual_seed(123)
    other = load_clip("tiny-clip")
    cache.load_or_encode(other, fp, "test", digits.test, fn, desc)
    assert cache.misses == 3  # changed model -> new entry
    assert len(list(tmp_path.glob("*.npz"))) == 3 and not list(tmp_path.glob("*.tmp*"))


def test_promptfl_on_digits_lowers_training_loss(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.train_args.comm_round = 4
    exp = build_experiment(quick_cfg, "promptfl", progress=False)
    res = exp.simulator.run()
    losses = [r["train_loss"] for r in res.rounds]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # decreases every round
    assert losses[-1] < losses[0] - 0.01, losses
    assert 0.0 <= res.summary["acc_last"] <= 1.0 and set(res.summary) == {"acc_last", "acc_last5", "acc_best"}


def test_local_keeps_its_own_prompt_and_uploads_nothing(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    exp = build_experiment(quick_cfg, "local", progress=False)
    sim = exp.simulator
    sim.run_round(0)
    first = {i: sim.states[i]["ctx"].clone() for i in range(3)}
    assert not torch.equal(first[0], first[1])
    assert sim.result.rounds[0]["bytes_up"] == 0 and sim.result.rounds[0]["bytes_down"] == 0
    sim.run_round(1)
    assert not torch.equal(first[0], sim.states[0]["ctx"])  # continued training from its own prompt
