"""FedPHA (docs/algorithms.md §FedPHA): the SVD projector against numpy's SVD and a hand-written P_L·Π, each loss term
by hand, local-only inference, per-length tokenization and the EOT parity encoder, uploads, per-dataset defaults, and
runs in the simulator and through the FedML cross-silo adapters."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.algorithms.fedpha import svd_projector
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import Batch, FeatureSet
from fedml_pfedmoap.federated.schedule import payload_bytes
from fedml_pfedmoap.federated.simulator import ClientData, Simulator

NAMES = ["cat", "dog", "sea turtle"]


@pytest.fixture(scope="module")
def text(tiny_backbone):
    return TextEncoder(tiny_backbone, NAMES, n_ctx=4)


def runtime(tiny_backbone, text):
    return Runtime(backbone=tiny_backbone, text=text, num_clients=3, seed=0, local_epochs=1, batch_size=4, rounds=3)


def random_set(n, seed, d=32, c=3):
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


def unit_rows(x):
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in x.tolist()]


def test_projector_spans_the_smallest_right_singular_vectors():
    g = torch.Generator().manual_seed(0)
    pg = torch.randn(16, 24, generator=g, dtype=torch.float64).float()
    proj = svd_projector(pg, ratio=0.8)  # c = floor(16 * 0.2) = 3: drop the 3 largest directions
    _, s, vt = np.linalg.svd(pg.double().numpy(), full_matrices=False)
    assert np.all(np.diff(s) <= 0)
    p = proj.double().numpy()
    for i in range(16):
        want = 0.0 if i < 3 else 1.0  # the largest three annihilated, the 13 smallest kept
        assert np.allclose(p @ vt[i], want * vt[i], atol=1e-5)
    assert np.allclose(p, p.T, atol=1e-6) and np.allclose(p @ p, p, atol=1e-5)
    assert abs(np.trace(p) - 13) < 1e-4
    pl = torch.randn(3, 24, generator=g)
    manual = [[sum(float(pl[i, k]) * float(p[k, j]) for k in range(24)) for j in range(24)] for i in range(3)]
    assert torch.allclose(pl @ proj, torch.tensor(manual, dtype=torch.float32), atol=1e-5)
    for v in vt[3:]:  # the orthogonal complement of the kept directions (the other 24 - 16 too) is annihilated
        p = p - np.outer(v, v)
    assert np.allclose(p, 0, atol=1e-5)


def test_loss_terms_match_hand_computation(tiny_backbone, text):
    rt = runtime(tiny_backbone, text)
    algo = get_algorithm("fedpha")(rt, {"alpha": 1.5})
    algo.init_server()
    payload, state = algo.client_payload(0), algo.init_client_state(0)
    model = algo.build_model(payload, state, train=True)
    with torch.no_grad():
        model.local_ctx.add_(0.3 * torch.randn(model.local_ctx.shape, generator=torch.Generator().manual_seed(1)))
    fs = random_set(6, 2)
    batch = Batch(fs.feats, fs.labels)
    pg, pl = model.ctx.detach(), model.local_ctx.detach()
    _, _, vt = np.linalg.svd(pg.double().numpy(), full_matrices=False)
    c = int(4 * (1 - 0.8))
    proj = vt[c:].T @ vt[c:]
    ptilde = torch.tensor(pl.double().numpy() @ proj, dtype=torch.float32)
    with torch.no_grad():  # each prompt encoded in its own call
        t_l, t_g, t_p = (unit_rows(text.features(x)) for x in (pl, pg, ptilde))
    s = float(rt.logit_scale)
    imgs = unit_rows(fs.feats)

    def ce(t):
        total = 0.0
        for img, y in zip(imgs, fs.labels.tolist()):
            logits = [s * sum(a * b for a, b in zip(img, row)) for row in t]
            mx = max(logits)
            total += mx + math.log(sum(math.exp(v - mx) for v in logits)) - logits[y]
        return total / len(imgs)

    mse = sum((a - b) ** 2 for ra, rb in zip(t_l, t_p) for a, b in zip(ra, rb)) / (3 * len(t_l[0]))
    push = sum(max(0.0, 1.5 - math.sqrt(sum((a - b) ** 2 for a, b in zip(ra, rb)))) for ra, rb in zip(t_l, t_g)) / 3
    loss = model.loss_from(text.features(model.train_prompts()), batch)
    assert float(loss) == pytest.approx(ce(t_l) + ce(t_g) + mse + push, rel=1e-4)
    assert push > 0 and mse > 0
    loss.backward()  # gradients reach P_G through CE(ℓ_G), the push term and the SVD
    assert model.ctx.grad.abs().sum() > 0 and model.local_ctx.grad.abs().sum() > 0
    # inference: the local prompt alone
    with torch.no_grad():
        logits = model.scorer()(batch)
    want = [[s * sum(a * b for a, b in zip(img, row)) for row in t_l] for img in imgs]
    assert torch.allclose(logits, torch.tensor(want), atol=1e-3)


def test_each_length_tokenized_separately(tiny_backbone, text):
    rt = runtime(tiny_backbone, text)
    algo = get_algorithm("fedpha")(rt, {"local_lengths": [4, 2, 7]})
    algo.init_server()
    assert algo.global_prompt.shape == (4, tiny_backbone.text_width)
    for cid, n_k in enumerate([4, 2, 7]):
        model = algo.build_model(algo.eval_payload(cid), algo.init_client_state(cid), train=False)
        assert model.local_ctx.shape == (n_k, tiny_backbone.text_width)
        own = TextEncoder(tiny_backbone, NAMES, n_ctx=n_k)  # an independent tokenization with n_k X's
        with torch.no_grad():
            assert torch.allclose(model.text_features(), F.normalize(own.features(model.local_ctx), dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="fedpha.local_lengths"):
        get_algorithm("fedpha")(rt, {"local_lengths": [4, 2]})


def test_eot_maxlen_parity_reads_after_the_true_eot(tiny_backbone, text):
    """Parity: a 2-token prompt is built from the 7-X tokenization ([SOT, ctx, suffix after 7 X's], zero-padded) and
    read at that tokenization's EOT index, 5 positions after its own EOT."""
    rt = runtime(tiny_backbone, text)
    algo = get_algorithm("fedpha")(rt, {"local_lengths": [4, 2, 7], "parity_eot_maxlen": True})
    model = algo.build_model({"client_index": 1, "global_prompt": torch.zeros(4, 64), "round": 0}, {}, train=False)
    m = tiny_backbone.model
    tok = text.tokenizer([" ".join(["X"] * 7) + f" {n}." for n in NAMES])
    eot = tok.argmax(-1)
    ctx = model.local_ctx.detach()
    with torch.no_grad():
        emb = m.token_embedding(tok)
        rows = []
        for c in range(len(NAMES)):
            x = torch.cat([emb[c, :1], ctx, emb[c, 8:], torch.zeros(5, emb.shape[-1])])
            assert x.shape[0] == 77
            x = x + m.positional_embedding
            x = m.ln_final(m.transformer(x.unsqueeze(0), attn_mask=m.attn_mask))[0]
            rows.append(x[eot[c]] @ m.text_projection)
        want = F.normalize(torch.stack(rows), dim=-1)
        got = model.text_features()
    assert torch.allclose(got, want, atol=1e-5)
    correct = F.normalize(TextEncoder(tiny_backbone, NAMES, n_ctx=2).features(ctx), dim=-1)
    assert not torch.allclose(got, correct, atol=1e-3)  # the offset changes the features


def test_upload_is_the_global_prompt_only(tiny_backbone, text):
    rt = runtime(tiny_backbone, text)
    algo = get_algorithm("fedpha")(rt, {"local_lengths": [4, 6, 2]})
    algo.init_server()
    states = {i: algo.init_client_state(i) for i in range(3)}
    ups = [algo.local_train(algo.client_payload(i), states[i], random_set(n, 10 + i)) for i, n in [(1, 4), (2, 12)]]
    for up in ups:
        assert set(up) == {"client_index", "n", "prompt", "metrics"}
        assert payload_bytes({k: v for k, v in up.items() if k != "metrics"}) == 4 * 64 * 4
    assert states[1]["local_ctx"].shape == (6, 64) and states[2]["local_ctx"].shape == (2, 64)
    algo.aggregate(ups)
    assert torch.allclose(algo.global_prompt, (4 * ups[0]["prompt"] + 12 * ups[1]["prompt"]) / 16, atol=1e-6)


def test_length_range_and_dataset_defaults(tiny_backbone, text):
    import random

    rt = runtime(tiny_backbone, text)
    algo = get_algorithm("fedpha")(rt, {"local_length_range": [4, 32]})
    rng = random.Random(0)
    assert algo.lengths == [rng.randint(4, 32) for _ in range(3)]
    cls = get_algorithm("fedpha")
    assert cls.defaults_for("cifar100") == {"lr": 0.002, "local_length_range": [4, 32]}
    assert cls.defaults_for("caltech101") == {}
    with pytest.raises(ValueError, match="fedpha"):
        cls(rt, {"local_lengths": [4, 4, 4], "local_length_range": [4, 8]})


@pytest.mark.parametrize("params", [{}, {"local_lengths": [4, 2, 6], "parity_eot_maxlen": True}])
def test_simulator_run(tiny_backbone, text, params):
    rt = runtime(tiny_backbone, text)
    clients = [ClientData(random_set(8, i), random_set(6, 40 + i)) for i in range(3)]
    algo = get_algorithm("fedpha")(rt, params)
    sim = Simulator(algo, clients, rounds=3, progress=False)
    res = sim.run()
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == 4 * 64 * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
    assert set(sim.states[0]) == {"local_ctx"}


@pytest.mark.fedml
@pytest.mark.parametrize("params", [{}, {"local_lengths": [4, 2, 6, 3]}])
def test_cross_silo_adapters_equal_simulator(tmp_path, params):
    from cross_silo_compare import adapters_match_simulator

    adapters_match_simulator(tmp_path, "fedpha", params)


def test_quickstart_run_and_dataset_defaults_under_user_keys(quick_cfg, monkeypatch):
    from fedml_pfedmoap.experiment import build_experiment

    cls = get_algorithm("fedpha")
    family = {"digits": {"alpha": 0.5, "lr": 0.01}}
    monkeypatch.setattr(cls, "defaults_for", classmethod(lambda c, ds: family.get(ds, {})))
    quick_cfg.algorithm_args["fedpha"] = {"lr": 0.002}
    ex = build_experiment(quick_cfg, "fedpha", progress=False)
    assert (ex.algorithm.hp.alpha, ex.algorithm.hp.lr) == (0.5, 0.002)  # family default applied, user key wins
    res = ex.simulator.run()
    n_ctx, width = ex.algorithm.shape
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == n_ctx * width * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
