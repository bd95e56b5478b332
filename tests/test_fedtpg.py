"""FedTPG (docs/algorithms.md §FedTPG): the generator against a hand-written attention + GEGLU, the class-name
embeddings, the generated context on another class list, uploads, averaging, schedules, parity switches, and runs in
the simulator and through the FedML cross-silo adapters."""
import math

import pytest
import torch
import torch.nn.functional as F

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.algorithms.fedtpg import PromptGenerator
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import FeatureSet
from fedml_pfedmoap.federated.schedule import payload_bytes
from fedml_pfedmoap.federated.simulator import ClientData, Simulator

NAMES = ["cat", "dog", "sea_turtle"]


@pytest.fixture(scope="module")
def rt(tiny_backbone):
    text = TextEncoder(tiny_backbone, NAMES, n_ctx=16)
    return Runtime(backbone=tiny_backbone, text=text, num_clients=3, seed=0, local_epochs=1, batch_size=4, rounds=4)


def random_set(n, seed, d=32, c=3):
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def hand_generator(gen, names, heads):
    """Q = LN_q(Q0) W_q; K, V from LN_kv(E); per-head softmax(QKᵀ/√d_h)V; out_proj; + W2(a ⊙ GELU(b)) of LN(A)."""
    mha = gen.attn
    w = gen.query.shape[1]
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = layer_norm(gen.query, gen.ln_q) @ wq.t() + bq
    kv = layer_norm(names, gen.ln_kv)
    k, v = kv @ wk.t() + bk, kv @ wv.t() + bv
    dh = w // heads
    out = torch.zeros(q.shape[0], w)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        for i in range(q.shape[0]):
            scores = [float(q[i, sl] @ k[j, sl]) / math.sqrt(dh) for j in range(k.shape[0])]
            mx = max(scores)
            e = [math.exp(s - mx) for s in scores]
            out[i, sl] = sum(e[j] / sum(e) * v[j, sl] for j in range(k.shape[0]))
    a = out @ mha.out_proj.weight.t() + mha.out_proj.bias  # no residual with the queries
    z = layer_norm(a, gen.ln_ff) @ gen.ff_in.weight.t() + gen.ff_in.bias
    half = z.shape[1] // 2
    gelu = 0.5 * z[:, half:] * (1 + torch.erf(z[:, half:] / math.sqrt(2)))
    return a + (z[:, :half] * gelu) @ gen.ff_out.weight.t() + gen.ff_out.bias


@pytest.mark.parametrize("width, kv_dim", [(8, 8), (8, 6)])
def test_generator_forward_matches_hand_written_attention_and_geglu(width, kv_dim):
    torch.manual_seed(3)
    gen = PromptGenerator(n_ctx=3, width=width, kv_dim=kv_dim, heads=2)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.3 * torch.randn(p.shape))
        names = torch.randn(5, kv_dim)
        assert torch.allclose(gen(names), hand_generator(gen, names, 2), atol=1e-5)
    assert gen.ff_in.out_features == 8 * width and gen.ff_out.in_features == 4 * width


def test_generator_size_at_vit_b16_widths():
    gen = PromptGenerator(n_ctx=4, width=512, kv_dim=512, heads=4)
    assert sum(p.numel() for p in gen.parameters()) == 4_206_080


def test_init_is_private_and_seeded(rt):
    state = torch.random.get_rng_state()
    a = get_algorithm("fedtpg")(rt)
    a.init_server()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = get_algorithm("fedtpg")(rt)
    b.init_server()
    for k in a.generator:
        assert torch.equal(a.generator[k], b.generator[k])
    q = a.generator["query"]
    assert q.shape == (4, rt.backbone.text_width) and 0.01 < float(q.std()) < 0.03


def test_name_embeddings_are_bare_names_and_context_for_other_classes(rt):
    algo = get_algorithm("fedtpg")(rt)
    algo.init_server()
    assert algo.rt.text.n_ctx == 4 and algo.rt.text.classnames == ["cat", "dog", "sea turtle"]
    model = algo.build_model(algo.client_payload(0), {}, train=False)
    tok = algo.rt.text.tokenizer(["cat", "dog", "sea turtle"])
    with torch.no_grad():
        e = F.normalize(rt.backbone.model.encode_text(tok), dim=-1)  # no template, no period
        assert torch.allclose(algo.name_embeddings(), e, atol=1e-5)
        assert torch.allclose(model.ctx, model.generator(e), atol=1e-5)
        novel = ["zebra", "red panda"]
        e2 = F.normalize(rt.backbone.model.encode_text(algo.rt.text.tokenizer(novel)), dim=-1)
        ctx2 = model.generator(e2)
        assert torch.allclose(model.context_for(novel), ctx2, atol=1e-5)
        ref = F.normalize(TextEncoder(rt.backbone, novel, n_ctx=4).features(ctx2), dim=-1)
        assert torch.allclose(model.text_features_for(novel), ref, atol=1e-5)
    assert ("fedtpg-names", ("zebra", "red panda")) in algo.rt.cache


def test_upload_is_the_whole_generator_and_averaging(rt):
    for uniform in (False, True):
        algo = get_algorithm("fedtpg")(rt, {"parity_uniform_avg": uniform})
        algo.init_server()
        ups = [algo.local_train(algo.client_payload(i), {}, random_set(n, 10 + i)) for i, n in [(0, 4), (1, 12)]]
        n_params = sum(v.numel() for v in algo.generator.values())
        for up in ups:
            assert set(up) == {"client_index", "n", "generator", "metrics"}
            assert payload_bytes({k: v for k, v in up.items() if k != "metrics"}) == n_params * 4
        assert payload_bytes(algo.client_payload(2)) == n_params * 4
        algo.aggregate(ups)
        w = (0.5, 0.5) if uniform else (4 / 16, 12 / 16)
        for k, v in algo.generator.items():
            want = w[0] * ups[0]["generator"][k] + w[1] * ups[1]["generator"][k]
            assert torch.allclose(v, want, atol=1e-6), k


def test_cosine_schedule_over_rounds(rt):
    algo = get_algorithm("fedtpg")(rt)
    lrs = [algo.round_lr({"round": t}, {}) for t in range(4)]
    assert lrs == pytest.approx([0.003 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    assert get_algorithm("fedtpg")(rt, {"lr_schedule": "constant"}).round_lr({"round": 3}, {}) == 0.003
    persistent = get_algorithm("fedtpg")(rt, {"parity_persistent_client_optim": True, "cosine_t_max": 500})
    assert persistent.round_lr({"round": 3}, {"steps": 1}) == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi / 500)))


def test_persistent_optimizer_restores_momentum(rt):
    """Parity: the second participation's first SGD step uses the momentum left by the first participation."""
    algo = get_algorithm("fedtpg")(rt, {"parity_persistent_client_optim": True, "lr_schedule": "constant"})
    algo.init_server()
    data = random_set(4, 20)  # one batch: one step per round
    state = {}
    algo.local_train(algo.client_payload(0), state, data)
    assert state["steps"] == 1 and len(state["momentum"]) == len(list(algo.new_generator().parameters()))
    buf0 = [b.clone() for b in state["momentum"]]
    payload = algo.client_payload(0)
    model = algo.build_model(payload, state, train=True)
    loss = model.loss_from(algo.rt.text.features(model.train_prompts()), next(data.chunks(4)))
    loss.backward()
    up = algo.local_train(payload, state, data)
    for (name, p), b0 in zip(model.generator.named_parameters(), buf0):
        grad = p.grad + 1e-5 * p.detach()
        want = p.detach() - 0.003 * (0.9 * b0 + grad)
        assert torch.allclose(up["generator"][name], want, atol=1e-6), name
    assert state["steps"] == 2


def test_fp16_generator_parity(rt):
    algo = get_algorithm("fedtpg")(rt, {"parity_fp16_generator": True})
    algo.init_server()
    assert all(v.dtype == torch.float16 for v in algo.generator.values())
    up = algo.local_train(algo.client_payload(0), {}, random_set(8, 30))
    assert all(v.dtype == torch.float16 for v in up["generator"].values())
    algo.aggregate([up])
    assert all(v.dtype == torch.float16 for v in algo.generator.values())


def test_rejects_bad_settings(rt):
    with pytest.raises(ValueError, match="fedtpg.lr_schedule"):
        get_algorithm("fedtpg")(rt, {"lr_schedule": "step"})
    with pytest.raises(ValueError, match="fedtpg.dp"):
        get_algorithm("fedtpg")(rt, {"dp": {"epsilon": 1.0}})
    with pytest.raises(ValueError, match="fedtpg.heads"):
        get_algorithm("fedtpg")(rt, {"heads": 3}).init_server()


def test_simulator_run_nothing_kept_locally(rt):
    clients = [ClientData(random_set(8, i), random_set(6, 40 + i)) for i in range(3)]
    algo = get_algorithm("fedtpg")(rt)
    res = Simulator(algo, clients, rounds=3, progress=False).run()
    n_params = sum(v.numel() for v in algo.generator.values())
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == n_params * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
    assert res.rounds[-1]["train_loss"] < res.rounds[0]["train_loss"]


@pytest.mark.fedml
@pytest.mark.parametrize("params", [{}, {"parity_persistent_client_optim": True, "parity_uniform_avg": True}])
def test_cross_silo_adapters_equal_simulator(tmp_path, params):
    from cross_silo_compare import adapters_match_simulator

    adapters_match_simulator(tmp_path, "fedtpg", params)


def test_quickstart_run(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    ex = build_experiment(quick_cfg, "fedtpg", progress=False)
    res = ex.simulator.run()
    n_params = sum(v.numel() for v in ex.algorithm.generator.values())
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == n_params * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
    assert ex.simulator.states[0] == {}
