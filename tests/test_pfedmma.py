"""pFedMMA and the cached lower layers: adapter block vs a hand-written formula, the gradient-scale op vs autograd on a
hand-written function, the split towers vs the full forward (features and gradients), uploads, the simulator and the
FedML cross-silo adapters, ResNet rejection and the token-cache budget."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.pfedmma import MMAAdapters, adapter_block, adapted_start, grad_scale
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip import towers
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.errors import ConfigError
from fedml_pfedmoap.federated.features import FeatureSet, encode_images
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.seeding import make_generator


def images(n, seed, size=32):
    return torch.randn(n, 3, size, size, generator=make_generator(seed, "imgs"))


def test_gradient_scale_forward_identity_backward_scaled():
    x = torch.randn(5, 3, generator=make_generator(1, "gs"), dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=make_generator(2, "gs"), dtype=torch.float64)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    (torch.sin(y) * w).sum().backward()
    assert torch.allclose(x.grad, 0.25 * torch.cos(x.detach()) * w)  # d/dx Σ w·sin(x), times the scale


def test_adapter_block_matches_hand_written_formula(tiny_backbone):
    blk = tiny_backbone.model.visual.transformer.resblocks[1]
    gen = make_generator(3, "adapter")
    ad = MMAAdapters(64, 64, 1, 1, 8, gen)
    for p in ad.parameters():  # nonzero biases too
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    x = torch.randn(2, 17, 64, generator=gen)
    s = 0.5
    got = adapter_block(blk, x, None, ad.vis_down[0], ad.shared[0], ad.vis_up[0], s)

    def ln(z, m):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    h = ln(x, blk.ln_1)
    attn, _ = blk.attn(h, h, h, need_weights=False)
    x2 = x + attn
    fc, pj = blk.mlp.c_fc, blk.mlp.c_proj
    mlp = F.gelu(ln(x2, blk.ln_2) @ fc.weight.t() + fc.bias) @ pj.weight.t() + pj.bias
    d, sh, u = ad.vis_down[0][0], ad.shared[0][0], ad.vis_up[0]
    y = torch.relu(torch.relu(h @ d.weight.t() + d.bias) @ sh.weight.t() + sh.bias) @ u.weight.t() + u.bias
    assert torch.allclose(got, x2 + mlp + s * y, atol=1e-5)


def test_adapter_parameters_get_inverse_scale_times_true_gradient(tiny_backbone):
    blk = tiny_backbone.model.visual.transformer.resblocks[1]
    gen = make_generator(4, "adapter")
    ad = MMAAdapters(64, 64, 1, 1, 8, gen)
    x = torch.randn(2, 17, 64, generator=gen, requires_grad=True)
    s = 0.01
    out = adapter_block(blk, x, None, ad.vis_down[0], ad.shared[0], ad.vis_up[0], s)
    out.square().sum().backward()
    used = [*ad.vis_down[0].parameters(), *ad.shared[0].parameters(), *ad.vis_up[0].parameters()]
    scaled = [p.grad.clone() for p in used] + [x.grad.clone()]
    for p in used + [x]:
        p.grad = None
    h = blk.ln_1(x)  # the same function without the gradient-scale ops
    plain = blk(x) + s * ad.vis_up[0](ad.shared[0](ad.vis_down[0](h)))
    plain.square().sum().backward()
    for got, p in zip(scaled[:-1], used):
        assert torch.allclose(got, p.grad / s, rtol=1e-4, atol=1e-6)
    assert torch.allclose(scaled[-1], x.grad, rtol=1e-4, atol=1e-7)  # the residual stream: the true gradient


@pytest.mark.parametrize("block", [0, 1])
def test_cached_visual_stream_equals_full_forward(tiny_backbone, block):
    imgs = images(4, 5)
    full = tiny_backbone.model.encode_image(imgs)
    stream = towers.visual_stream(tiny_backbone, imgs, block)
    assert stream.shape == (4, 17, 64)
    assert (towers.visual_from_stream(tiny_backbone, stream, block) - full).abs().max() <= 1e-5
    pooled, cached = encode_images(tiny_backbone, imgs, True, block)
    assert torch.equal(cached, stream) and (pooled - full).abs().max() <= 1e-5


@pytest.mark.parametrize("block", [0, 1, 2])
def test_cached_text_stream_equals_encode_text(tiny_backbone, block):
    from fedml_pfedmoap.clip.openclip import get_open_clip

    prompts = ["a photo of a cat.", "a photo of a golden retriever."]
    full = tiny_backbone.model.encode_text(get_open_clip().get_tokenizer("tiny-clip")(prompts))  # 77 tokens
    tokens, eot = towers.text_tokens(tiny_backbone, prompts)
    assert tokens.shape[1] < 77
    got = towers.text_from_stream(tiny_backbone, towers.text_stream(tiny_backbone, tokens, block), eot, block)
    assert (got - full).abs().max() <= 1e-5


def _split_and_full_grads(backbone, rt, hp, imgs, labels):
    """Loss gradients of the adapters: run from the cached streams vs a full forward of both towers."""
    algo = get_algorithm("pfedmma")(rt, hp)
    algo.init_server()
    model = algo.build_model(algo.client_payload(0), algo.init_client_state(0))
    vs, ts = model.vis_start, model.text_start
    stream = towers.visual_stream(backbone, imgs, vs)
    from fedml_pfedmoap.federated.features import Batch

    out = []
    for cached in (True, False):
        if cached:
            logits = model.logits(Batch(None, labels, stream), model.text_features())
        else:  # full towers: every block from the embeddings, the adapted ones through the adapter
            def vis_fn(i, blk, x, mask):
                return model._block_fn("vis")(i, blk, x, mask) if i >= vs else blk(x, attn_mask=mask)

            def text_fn(i, blk, x, mask):
                return model._block_fn("text")(i, blk, x, mask) if i >= ts else blk(x, attn_mask=mask)

            img = towers.visual_from_stream(backbone, backbone.model.visual._embeds(imgs), 0, vis_fn)
            tok, eot = towers.text_tokens(backbone, [hp.get("template", "a photo of a {}.").format(c)
                                                     for c in rt.text.classnames])
            emb = backbone.model.token_embedding(tok) + backbone.model.positional_embedding[:tok.shape[1]]
            txt = towers.text_from_stream(backbone, emb, eot, 0, text_fn)
            logits = rt.logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits, labels).backward()
        out.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    return out


def test_cached_path_equals_full_forward_logits_and_gradients(tiny_backbone, runtime):
    imgs, labels = images(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    (lc, gc), (lf, gf) = _split_and_full_grads(tiny_backbone, runtime, {"adapter_start": 2, "adapter_scale": 0.1},
                                               imgs, labels)
    assert (lc - lf).abs().max() <= 1e-4
    for a, b in zip(gc, gf):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12


@pytest.fixture
def text(tiny_backbone):
    return TextEncoder(tiny_backbone, ["cat", "dog", "bird"], n_ctx=4)


@pytest.fixture
def runtime(tiny_backbone, text):
    return Runtime(backbone=tiny_backbone, text=text, num_clients=3, seed=0, local_epochs=1, batch_size=4)


def stream_set(backbone, n, seed, block=1):
    imgs = images(n, seed)
    feats, toks = encode_images(backbone, imgs, True, block)
    return FeatureSet(feats, torch.arange(n) % 3, toks)


def test_layer_rule():
    assert [adapted_start(d, None) for d in (12, 24, 3, 2)] == [5, 9, 2, 2]
    with pytest.raises(ValueError, match="adapter_start"):
        adapted_start(2, 3)


def test_simulator_uploads_only_shared_projection(tiny_backbone, runtime):
    clients = [ClientData(stream_set(tiny_backbone, 8, i), stream_set(tiny_backbone, 6, 40 + i)) for i in range(3)]
    algo = get_algorithm("pfedmma")(runtime, {"lr": 0.01})
    sim = Simulator(algo, clients, rounds=2, progress=False)
    res = sim.run()
    shared = 32 * 32 + 32  # one layer adapted per tower (depth 2): one shared projection
    for r in res.rounds:
        assert r["bytes_up"] == r["bytes_down"] == shared * 4
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0
    up = algo.local_train(algo.client_payload(0), sim.states[0], clients[0].train)
    assert set(up["shared"]) == {"shared.0.0.weight", "shared.0.0.bias"}
    assert not any(k.startswith("shared") for k in sim.states[0]["adapters"])


def test_stale_text_cache_parity_switch(tiny_backbone, runtime):
    data = stream_set(tiny_backbone, 6, 9)
    algo = get_algorithm("pfedmma")(runtime, {"parity_stale_text_cache": True})
    algo.init_server()
    st = algo.init_client_state(0)
    first = algo.evaluate(algo.client_payload(0), st, data)
    for k, p in st["adapters"].items():
        if k.startswith("text_"):  # change only the text side
            p.add_(1.0)
    assert algo.evaluate(algo.client_payload(0), st, data).loss == pytest.approx(first.loss)  # text side stale
    fresh = get_algorithm("pfedmma")(runtime, {})
    fresh.init_server()
    assert fresh.evaluate(fresh.client_payload(0), st, data).loss != pytest.approx(first.loss)


def test_novel_classes_scored_by_the_full_client_model(tiny_backbone, runtime):
    """Inside ``over_classes`` the client's model (shared + its own adapters) scores the novel names: logits equal a
    fresh algorithm built on a novel-name runtime; the stale-text parity switch keeps one first evaluation per class
    list, so the base list's text never reaches the novel scoring."""
    novel = TextEncoder(tiny_backbone, ["fish", "horse"], n_ctx=4)
    data = stream_set(tiny_backbone, 6, 9)
    data = FeatureSet(data.feats, data.labels % 2, data.patches)
    ref_algo = get_algorithm("pfedmma")(Runtime(backbone=tiny_backbone, text=novel, num_clients=3, seed=0), {})
    ref_algo.init_server()
    for params in ({}, {"parity_stale_text_cache": True}):
        algo = get_algorithm("pfedmma")(runtime, params)
        algo.init_server()
        st = algo.init_client_state(1)
        for k, p in st["adapters"].items():  # a client whose own adapters differ from the init
            p.add_(0.05 * torch.randn(p.shape, generator=make_generator(4, k)))
        base = algo.evaluate(algo.client_payload(1), st, stream_set(tiny_backbone, 6, 9))
        with algo.over_classes(novel):
            got = algo.evaluate(algo.client_payload(1), st, data)
        want = ref_algo.evaluate(ref_algo.client_payload(1), st, data)
        assert got.loss == pytest.approx(want.loss, rel=1e-6) and got.correct == want.correct
        assert algo.evaluate(algo.client_payload(1), st, stream_set(tiny_backbone, 6, 9)).loss == pytest.approx(
            base.loss, rel=1e-6)


def test_resnet_rejected_naming_the_model():
    from types import SimpleNamespace

    from open_clip.modified_resnet import ModifiedResNet

    rn = SimpleNamespace(name="RN50", model=SimpleNamespace(visual=ModifiedResNet((1, 1, 1, 1), 32, 2, 32, 8)))
    with pytest.raises(ConfigError, match="'RN50' has a ModifiedResNet image tower.*needs a ViT"):
        get_algorithm("pfedmma").stream_block_for(rn, get_algorithm("pfedmma").parse_params({}))


def test_quickstart_cache_and_budget_fallback(quick_cfg, caplog):
    from fedml_pfedmoap.experiment import build_experiment
    from fedml_pfedmoap.federated.features import LazyPatches

    with caplog.at_level(logging.INFO, logger="fedml_pfedmoap.experiment"):
        ex = build_experiment(quick_cfg, "pfedmma", progress=False)
    assert "cached" in caplog.text and ex.simulator.clients[0].train.patches.shape[1:] == (17, 64)
    res = ex.simulator.run()
    assert all(math.isfinite(r["train_loss"]) for r in res.rounds)
    quick_cfg.algorithm_args["pfedmma"] = {"token_cache_gb": 0.0}
    with caplog.at_level(logging.INFO, logger="fedml_pfedmoap.experiment"):
        lazy = build_experiment(quick_cfg, "pfedmma", progress=False)
    assert "on the fly" in caplog.text and isinstance(lazy.simulator.clients[0].train.patches, LazyPatches)
    assert lazy.simulator.run().rounds[-1]["acc_mean"] == pytest.approx(res.rounds[-1]["acc_mean"], abs=1e-6)


@pytest.mark.fedml
def test_cross_silo_adapters_equal_simulator(tmp_path):
    from cross_silo_compare import adapters_match_simulator

    adapters_match_simulator(tmp_path, "pfedmma", {})


@pytest.mark.parametrize("augment", ["online", "bank:2"])
def test_augmented_training_carries_the_stream(quick_cfg, augment):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.data_args.train_augment = augment
    quick_cfg.train_args.comm_round = 1
    ex = build_experiment(quick_cfg, "pfedmma", progress=False)
    batch = next(ex.simulator.clients[0].train.batches(4, make_generator(0, "b")))
    assert batch.patches.shape[1:] == (17, 64)  # the residual stream after block 1 of mini-clip, not patch tokens
    assert math.isfinite(ex.simulator.run().rounds[0]["train_loss"])
