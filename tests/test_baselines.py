"""FedProx, FedOTP, FedPGP and PromptFolio: formulas against hand-written computations, upload contents, short runs
through build_experiment, and the patch-token paths of the image tower (docs/algorithms.md §Methods)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.backbone import ClipBackbone, attention_pool_all_queries
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import Batch, FeatureSet, LazyPatches, patch_cache_bytes
from fedml_pfedmoap.federated.schedule import payload_bytes
from test_ot import reference_ot

PERSONAL = ["fedotp", "fedpgp", "promptfolio"]


@pytest.fixture(scope="module")
def rt(tiny_backbone):
    text = TextEncoder(tiny_backbone, ["cat", "dog", "sea turtle"], n_ctx=4)
    return Runtime(backbone=tiny_backbone, text=text, num_clients=4, seed=0, local_epochs=2, batch_size=4)


def random_set(rt, n, seed, m=16):
    g = torch.Generator().manual_seed(seed)
    d, c = rt.backbone.embed_dim, rt.text.num_classes
    return FeatureSet(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g),
                      torch.randn(n, m, d, generator=g))


def batch_of(fs):
    return Batch(fs.feats, fs.labels, fs.patches)


def unit(v):
    norm = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / norm for x in v]


def normalized_text(rt, prompt):
    """Text features of one prompt (its own encoder call), each row normalized by hand -> list of C lists."""
    with torch.no_grad():
        feats = rt.text.features(prompt.detach())
    return [unit(row.tolist()) for row in feats]


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def cross_entropy(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels):
        mx = max(row)
        total += mx + math.log(sum(math.exp(v - mx) for v in row)) - row[int(y)]
    return total / len(labels)


def count_text_calls(monkeypatch, rt):
    calls = []
    orig = rt.text.features

    def wrapped(ctx):
        calls.append(tuple(ctx.shape))
        return orig(ctx)

    monkeypatch.setattr(rt.text, "features", wrapped)
    return calls


def build(rt, name, params=None, client=0):
    algo = get_algorithm(name)(rt, params or {})
    algo.init_server()
    algo.begin_round(0, list(range(rt.num_clients)))
    payload = algo.client_payload(client)
    state = algo.init_client_state(client)
    return algo, payload, state


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---- formulas -------------------------------------------------------------------------------------------------------

def test_fedprox_proximal_term_matches_hand_computation(rt):
    algo, payload, state = build(rt, "fedprox")
    model = algo.build_model(payload, state, train=True)
    perturb(model, 1)
    ctx, ref = model.ctx.detach(), payload["global_prompt"]
    manual = 0.0
    for i in range(ctx.shape[0]):
        for j in range(ctx.shape[1]):
            manual += (float(ctx[i, j]) - float(ref[i, j])) ** 2
    assert float(algo.extra_loss(model, payload)) == pytest.approx(0.5 / 2 * manual, rel=1e-5)
    assert algo.hp.mu == 0.5


def test_fedprox_pulls_toward_global(rt):
    data = random_set(rt, 16, seed=3)
    dists = {}
    for name, params in [("promptfl", {}), ("fedprox", {"mu": 50.0})]:
        algo, payload, state = build(rt, name, params)
        up = algo.local_train(payload, state, data)
        dists[name] = float((up["prompt"] - payload["global_prompt"]).norm())
    assert dists["fedprox"] < dists["promptfl"]


def test_promptfolio_logits_match_hand_computation(rt, monkeypatch):
    algo, payload, state = build(rt, "promptfolio")
    model = algo.build_model(payload, state, train=True)
    perturb(model, 2)
    fs = random_set(rt, 5, seed=4)
    tg, tl = normalized_text(rt, model.ctx), normalized_text(rt, model.local_ctx)
    calls = count_text_calls(monkeypatch, rt)
    logits = model(batch_of(fs))
    assert calls == [(2,) + tuple(rt.ctx_shape)]  # global and local in one batched call
    s, theta = float(rt.logit_scale), 0.4
    mix = [[(1 - theta) * a + theta * b for a, b in zip(tg[c], tl[c])] for c in range(len(tg))]
    assert any(abs(math.sqrt(dot(m, m)) - 1) > 1e-3 for m in mix)  # the mixture is not renormalized
    for b in range(len(fs)):
        img = unit(fs.feats[b].tolist())
        for c in range(len(mix)):
            assert float(logits[b, c]) == pytest.approx(s * dot(img, mix[c]), abs=1e-4)


def test_fedpgp_loss_matches_hand_computation(rt, monkeypatch):
    algo, payload, state = build(rt, "fedpgp")
    model = algo.build_model(payload, state, train=True)
    perturb(model, 5)
    assert model.U.shape == (rt.ctx_shape[0], 8) and model.V.shape == (8, rt.ctx_shape[1])
    sigma, U, V = model.ctx.detach(), model.U.detach(), model.V.detach()
    full = torch.zeros_like(sigma)
    for i in range(sigma.shape[0]):
        for j in range(sigma.shape[1]):
            full[i, j] = sigma[i, j] + sum(float(U[i, k]) * float(V[k, j]) for k in range(U.shape[1]))
    f_full, f_sigma = normalized_text(rt, full), normalized_text(rt, sigma)
    f0 = normalized_text(rt, rt.text.x_ctx)  # the fixed "X ... X {name}." embeddings
    fs = random_set(rt, 6, seed=6)
    s = float(rt.logit_scale)
    logits = [[s * dot(unit(fs.feats[b].tolist()), f_full[c]) for c in range(len(f_full))] for b in range(len(fs))]
    ce = cross_entropy(logits, fs.labels.tolist())
    con_logits = [[dot(f0[c], f_sigma[c]) / 0.5, dot(f_sigma[c], f_full[c]) / 0.5] for c in range(len(f0))]
    con = cross_entropy(con_logits, [0] * len(f0))
    model.initial_features()  # f0 is cached once; afterwards each step encodes sigma and sigma+UV together
    calls = count_text_calls(monkeypatch, rt)
    loss = model.loss(batch_of(fs))
    assert calls == [(2,) + tuple(rt.ctx_shape)]
    assert float(loss) == pytest.approx(ce + 0.5 * con, rel=1e-4)
    assert float(model(batch_of(fs))[0, 0]) == pytest.approx(logits[0][0], abs=1e-4)


def test_fedotp_logits_match_hand_computation(rt, monkeypatch):
    algo, payload, state = build(rt, "fedotp", {"check_every": 1, "eps": 0.05})
    assert (algo.hp.eps, algo.hp.gamma, algo.hp.thresh, algo.hp.max_iter, algo.hp.lr) == (0.05, 0.8, 1e-3, 100, 1e-3)
    model = algo.build_model(payload, state, train=True)
    perturb(model, 7)
    fs = random_set(rt, 3, seed=8, m=6)
    text = [normalized_text(rt, model.ctx), normalized_text(rt, model.local_ctx)]  # (N=2) x C x D
    C, M = len(text[0]), fs.patches.shape[1]
    sims = []  # problems ordered (image, class)
    for b in range(len(fs)):
        toks = [unit(fs.patches[b, m].tolist()) for m in range(M)]
        for c in range(C):
            sims.append([[dot(toks[m], text[n][c]) for n in range(2)] for m in range(M)])
    cost = [[[1.0 - x for x in row] for row in sim] for sim in sims]
    plan, _ = reference_ot(cost, 0.05, method="cot", gamma=0.8, thresh=1e-3, max_iter=100)
    s = float(rt.logit_scale)
    expected = [s * sum(plan[p][m][n] * sims[p][m][n] for m in range(M) for n in range(2)) for p in range(len(sims))]
    calls = count_text_calls(monkeypatch, rt)
    logits = model(batch_of(fs))
    assert calls == [(2,) + tuple(rt.ctx_shape)]
    assert logits.shape == (len(fs), C)
    for p, want in enumerate(expected):
        assert float(logits[p // C, p % C]) == pytest.approx(want, abs=1e-4)
    # gradients reach both prompts, only through sim
    F.cross_entropy(logits, fs.labels).backward()
    assert model.ctx.grad.abs().sum() > 0 and model.local_ctx.grad.abs().sum() > 0


def test_fedotp_rejects_bad_settings(rt):
    with pytest.raises(ValueError, match="fedotp.ot_method"):
        get_algorithm("fedotp")(rt, {"ot_method": "emd"})
    with pytest.raises(ValueError, match="unknown key"):
        get_algorithm("fedotp")(rt, {"epsilon": 0.1})


@pytest.mark.parametrize("name", ["fedotp", "fedpgp"])
def test_round0_all_clients_parity_schedule(rt, name):
    """docs/algorithms.md: with the flag every client trains in round 0, then the shared `frac` schedule resumes; the
    default follows the shared schedule from round 0."""
    from fedml_pfedmoap.federated.schedule import sample_clients
    from fedml_pfedmoap.federated.simulator import ClientData, Simulator

    clients = [ClientData(random_set(rt, 4, seed=40 + i), random_set(rt, 3, seed=50 + i)) for i in range(4)]
    for flag in (False, True):
        algo = get_algorithm(name)(rt, {"round0_all_clients": flag})
        sim = Simulator(algo, clients, rounds=2, frac=0.5, seed=3, progress=False)
        assert sim.run_round(0)["participants"] == (4 if flag else 2)
        trained = {c for c in range(4) if any(not torch.equal(sim.states[c][k], algo._local_init()[k])
                                              for k in algo.local_keys)}  # private prompt moved away from the init
        assert trained == (set(range(4)) if flag else set(sample_clients(4, 0.5, 3, 0)))
        assert sim.run_round(1)["participants"] == 2


def test_fedotp_nonfinite_raise_names_client_round_and_batch(rt):
    algo, payload, state = build(rt, "fedotp", {"on_nonfinite": "raise"})
    fs = random_set(rt, 4, seed=9)
    fs.patches[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="fedotp client 0 round 0 train batch 1"):
        algo.local_train(payload, state, fs)


# ---- uploads and per-client state -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PERSONAL)
def test_upload_contains_only_the_global_part(rt, name):
    algo, payload, state = build(rt, name)
    init = {k: v.clone() for k, v in state.items()}
    assert set(init) == set(algo.local_keys)
    up = algo.local_train(payload, state, random_set(rt, 8, seed=10))
    assert set(up) == {"client_index", "n", "prompt", "metrics"}
    assert up["prompt"].shape == rt.ctx_shape
    n_ctx, width = rt.ctx_shape
    assert payload_bytes({k: v for k, v in up.items() if k != "metrics"}) == n_ctx * width * 4
    assert not torch.equal(up["prompt"], payload["global_prompt"])
    for k in algo.local_keys:  # the private part was trained and kept in the client's state, not uploaded
        assert not torch.equal(state[k], init[k])
        assert state[k].device.type == "cpu" and not state[k].requires_grad


@pytest.mark.parametrize("name", PERSONAL)
def test_server_averages_global_and_clients_keep_local(rt, name):
    algo, _, _ = build(rt, name)
    states = {i: algo.init_client_state(i) for i in range(rt.num_clients)}
    ups = [algo.local_train(algo.client_payload(i), states[i], random_set(rt, n, seed=20 + i))
           for i, n in [(0, 4), (1, 12)]]
    algo.aggregate(ups)
    want = (4 * ups[0]["prompt"] + 12 * ups[1]["prompt"]) / 16
    assert torch.allclose(algo.global_prompt, want, atol=1e-6)
    model = algo.build_model(algo.eval_payload(1), states[1], train=False)
    assert torch.allclose(model.ctx.cpu(), algo.global_prompt)
    for k in algo.local_keys:
        assert torch.equal(getattr(model, k).detach().cpu(), states[1][k])
    # a never-trained client is evaluated with [latest global; shared init]
    fresh = algo.build_model(algo.eval_payload(3), states[3], train=False)
    for k, v in algo.local_init().items():
        assert torch.equal(getattr(fresh, k).detach().cpu(), v)
    assert torch.equal(algo.init_client_state(2)[algo.local_keys[0]], states[3][algo.local_keys[0]])


# ---- short runs through build_experiment ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedprox", "fedotp", "fedpgp", "promptfolio"])
def test_quickstart_run(quick_cfg, name):
    from fedml_pfedmoap.experiment import build_experiment

    ex = build_experiment(quick_cfg, name, progress=False)
    res = ex.simulator.run()
    n_ctx, width = ex.algorithm.rt.ctx_shape
    assert len(res.rounds) == 2
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == n_ctx * width * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
        if name == "fedotp":
            assert r["ot_nonfinite"] == 0
    assert set(ex.simulator.states[0]) == set(getattr(ex.algorithm, "local_keys", ()))


def test_fedotp_on_the_fly_patches_equal_cached(quick_cfg):
    from fedml_pfedmoap.experiment import Resources, build_experiment

    quick_cfg.train_args.comm_round = 1
    res = Resources()
    cached = build_experiment(quick_cfg, "fedotp", resources=res, progress=False)
    assert isinstance(cached.simulator.clients[0].train.patches, torch.Tensor)
    quick_cfg.algorithm_args["fedotp"] = {"patch_cache_gb": 0.0}
    lazy = build_experiment(quick_cfg, "fedotp", resources=res, progress=False)
    assert isinstance(lazy.simulator.clients[0].train.patches, LazyPatches)
    a, b = cached.simulator.run().rounds[0], lazy.simulator.run().rounds[0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["acc_mean"] == b["acc_mean"]


def test_patch_cache_bytes():
    assert patch_cache_bytes(1, 196, 512) == 196 * 512 * 4  # ViT-B/16, fp32
    assert patch_cache_bytes(1000, 49, 1024, bytes_per_value=2) == 1000 * 49 * 1024 * 2  # RN50, fp16


# ---- patch tokens of the image tower --------------------------------------------------------------------------------

def test_vit_patch_tokens_equal_manual_computation(tiny_backbone):
    vis = tiny_backbone.model.visual
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pooled, tokens = tiny_backbone.encode_image(imgs, patches=True)
    with torch.no_grad():
        x = vis.conv1(imgs).flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = vis.class_embedding.view(1, 1, -1).expand(len(imgs), 1, -1)
        x = vis.ln_pre(torch.cat([cls, x], dim=1) + vis.positional_embedding)
        x = vis.ln_post(vis.transformer(x))
        manual = x[:, 1:] @ vis.proj  # every token after ln_post, projected, class token dropped
    assert tokens.shape == (2, 16, tiny_backbone.embed_dim)
    assert torch.allclose(tokens, manual, atol=1e-5)
    assert torch.allclose(pooled, tiny_backbone.model.encode_image(imgs), atol=1e-6)
    assert torch.allclose(pooled, x[:, 0] @ vis.proj, atol=1e-5)


def test_resnet_attention_pool_with_all_queries():
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    vis = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=64, width=8).eval()
    pool = vis.attnpool
    fmap = torch.randn(2, 256, 2, 2)
    with torch.no_grad():
        out = attention_pool_all_queries(pool, fmap)
        stock = pool(fmap)
    assert out.shape == (2, 5, 16)
    assert torch.allclose(out[:, 0], stock, atol=1e-5)
    # hand-written multi-head attention for every query position
    heads, width = pool.num_heads, 256
    dh = width // heads
    with torch.no_grad():
        for b in range(2):
            seq = fmap[b].flatten(1).t()
            seq = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding
            q, k, v = pool.q_proj(seq), pool.k_proj(seq), pool.v_proj(seq)
            for i in range(seq.shape[0]):
                parts = []
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    w = [float(q[i, sl] @ k[j, sl]) / math.sqrt(dh) for j in range(seq.shape[0])]
                    mx = max(w)
                    e = [math.exp(x - mx) for x in w]
                    parts.append(sum(e[j] / sum(e) * v[j, sl] for j in range(seq.shape[0])))
                assert torch.allclose(pool.c_proj(torch.cat(parts)), out[b, i], atol=1e-5)

    class Wrapper(nn.Module):  # the parts ClipBackbone reads
        def __init__(self):
            super().__init__()
            self.visual = vis
            self.token_embedding = nn.Embedding(4, 8)
            self.logit_scale = nn.Parameter(torch.tensor(0.0))

        def encode_image(self, x):
            return self.visual(x)

    bb = ClipBackbone(Wrapper(), "rn-test", None)
    imgs = torch.randn(2, 3, 64, 64)
    pooled, tokens = bb.encode_image(imgs, patches=True)
    assert tokens.shape == (2, 4, 16)
    assert torch.allclose(pooled, vis(imgs), atol=1e-5)
