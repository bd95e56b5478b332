"""FedMGP: selection probabilities and draw order vs a hand-written loop with the same seeds, rank-slot aggregation and
write-back by hand, the diversity sign, the cached image input vs a hand-written full ViT pass with appended prompts,
the simulator and the FedML cross-silo adapters."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip import get_tokenizer

from fedml_pfedmoap.algorithms import get_algorithm
from fedml_pfedmoap.algorithms.fedmgp import FedMGPModel, mean_pair_l1, rank_aligned_slots, select_groups
from fedml_pfedmoap.algorithms.protocol import Runtime
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.federated.features import Batch, FeatureSet, encode_images
from fedml_pfedmoap.federated.simulator import ClientData, Simulator
from fedml_pfedmoap.seeding import make_generator


@pytest.fixture
def runtime(tiny_backbone):
    text = TextEncoder(tiny_backbone, ["cat", "dog", "bird"], n_ctx=4)
    return Runtime(backbone=tiny_backbone, text=text, num_clients=3, seed=0, local_epochs=1, batch_size=4)


def test_selection_matches_hand_written_loop():
    gen = make_generator(1, "sel-data")
    prompts, slots = torch.randn(5, 2, 6, generator=gen), torch.randn(2, 2, 6, generator=gen)
    tau = 0.5
    sims = []
    for g in range(5):
        best = -2.0
        for r in range(2):
            a, b = prompts[g].flatten().double(), slots[r].flatten().double()
            best = max(best, float(a @ b / (a.norm() * b.norm())))
        sims.append(best)
    exps = [math.exp(s / tau) for s in sims]
    p = [e / sum(exps) for e in exps]
    ref_gen, remaining, order = make_generator(7, "draw"), list(range(5)), []
    for _ in range(3):
        w = torch.tensor([p[i] for i in remaining], dtype=torch.float64)
        pick = int(torch.multinomial(w / w.sum(), 1, generator=ref_gen))
        order.append(remaining[pick])
        del remaining[pick]
    assert select_groups(prompts, slots, 3, tau, make_generator(7, "draw")) == order
    first = select_groups(prompts, None, 2, tau, make_generator(8, "draw"))
    assert first == torch.randperm(5, generator=make_generator(8, "draw"))[:2].tolist()


def test_rank_slots_averaged_by_hand_and_written_back():
    a = {"n": 1, "text_slots": torch.tensor([[[1.0]], [[2.0]]]), "vis_slots": torch.tensor([[[0.0]], [[4.0]]])}
    b = {"n": 3, "text_slots": torch.tensor([[[5.0]], [[6.0]]]), "vis_slots": torch.tensor([[[8.0]], [[0.0]]])}
    w = rank_aligned_slots([a, b], 2, unweighted=False)
    assert w["text"].flatten().tolist() == [(1 + 15) / 4, (2 + 18) / 4] and w["vis"].flatten().tolist() == [6.0, 1.0]
    u = rank_aligned_slots([a, b], 2, unweighted=True)
    assert u["text"].flatten().tolist() == [3.0, 4.0]
    state = {"text": torch.zeros(4, 1, 1), "vis": torch.zeros(4, 1, 1), "selected_round": 3,
             "text_selected": torch.tensor([2, 0]), "vis_selected": torch.tensor([1, 3])}
    payload = {"aggregated_round": 3, "text_slots": w["text"], "vis_slots": w["vis"]}
    groups = get_algorithm("fedmgp").written_back(payload, state)
    assert groups["text"].flatten().tolist() == [5.0, 0.0, 4.0, 0.0]  # rank 0 -> group 2, rank 1 -> group 0
    assert groups["vis"].flatten().tolist() == [0.0, 6.0, 0.0, 1.0]
    assert get_algorithm("fedmgp").written_back({**payload, "aggregated_round": 2}, state)["text"].abs().sum() == 0


def test_cached_input_tokens_equal_full_vit_with_appended_prompts(tiny_backbone, runtime):
    algo = get_algorithm("fedmgp")(runtime, {"groups": 3})
    init = algo.initial_groups()
    model = FedMGPModel(algo.rt, algo.hp, init["text"], init["vis"])
    imgs = torch.randn(2, 3, 32, 32, generator=make_generator(2, "imgs"))
    _, tokens = encode_images(tiny_backbone, imgs, True, 0)
    got = model.image_features(tokens)
    vis = tiny_backbone.model.visual
    x = vis.conv1(imgs).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(2, 1, -1), x], dim=1) + vis.positional_embedding
    for g in range(3):  # hand-written: prompts appended without positions, ln_pre, blocks, ln_post(CLS), proj
        h = vis.ln_pre(torch.cat([x, init["vis"][g].expand(2, -1, -1)], dim=1))
        for blk in vis.transformer.resblocks:
            h = blk(h)
        ref = F.normalize(vis.ln_post(h[:, 0]) @ vis.proj, dim=-1)
        assert (got[g] - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("sign", ["repulsive", "as_released"])
def test_diversity_sign(runtime, sign):
    algo = get_algorithm("fedmgp")(runtime, {"groups": 3, "div_sign": sign})
    init = algo.initial_groups()
    model = FedMGPModel(algo.rt, algo.hp, init["text"], init["vis"])
    _, tokens = encode_images(runtime.backbone, torch.randn(2, 3, 32, 32, generator=make_generator(3, "i")), True, 0)
    batch = Batch(None, torch.tensor([0, 2]), tokens)
    text = model.text_features()
    logits, img = model.group_logits(batch, text)
    ce = sum(F.cross_entropy(logits[g], batch.labels) for g in range(3)) / 3

    def dist(x):  # mean over pairs i < j of the mean |x_i − x_j|
        pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
        return sum((x[i] - x[j]).abs().mean() for i, j in pairs) / len(pairs)

    d = (dist(text) + dist(img)) / 2
    assert float(mean_pair_l1(text)) == pytest.approx(float(dist(text)), rel=1e-6)
    expected = ce - d if sign == "repulsive" else ce + d
    assert float(model.loss(batch)) == pytest.approx(float(expected), rel=1e-5)


def stream_set(backbone, n, seed):
    feats, toks = encode_images(backbone, torch.randn(n, 3, 32, 32, generator=make_generator(seed, "im")), True, 0)
    return FeatureSet(feats, torch.arange(n) % 3, toks)


def test_simulator_uploads_k_groups_per_modality(tiny_backbone, runtime):
    clients = [ClientData(stream_set(tiny_backbone, 8, i), stream_set(tiny_backbone, 6, 40 + i)) for i in range(3)]
    algo = get_algorithm("fedmgp")(runtime, {"groups": 3, "lr": 0.01})
    sim = Simulator(algo, clients, rounds=3, progress=False)
    res = sim.run()
    up = 2 * (2 * 64 + 2 * 64) * 4  # k = 2 groups of 2 text (W 64) and 2 visual (W 64) tokens, fp32
    assert [r["bytes_up"] for r in res.rounds] == [up] * 3
    assert [r["bytes_down"] for r in res.rounds] == [0, up, up]
    assert all(math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0 for r in res.rounds)


def test_resnet_rejected():
    from types import SimpleNamespace

    from open_clip.modified_resnet import ModifiedResNet

    from fedml_pfedmoap.errors import ConfigError

    rn = SimpleNamespace(name="RN50", model=SimpleNamespace(visual=ModifiedResNet((1, 1, 1, 1), 32, 2, 32, 8)))
    with pytest.raises(ConfigError, match="fedmgp.*'RN50'"):
        get_algorithm("fedmgp").stream_block_for(rn, get_algorithm("fedmgp").parse_params({}))


@pytest.mark.fedml
def test_cross_silo_adapters_equal_simulator(tmp_path):
    from cross_silo_compare import adapters_match_simulator

    adapters_match_simulator(tmp_path, "fedmgp", {"groups": 3})


def test_quickstart_run(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    quick_cfg.algorithm_args["fedmgp"] = {"groups": 2}
    ex = build_experiment(quick_cfg, "fedmgp", progress=False)
    assert ex.simulator.clients[0].train.patches.shape[1:] == (17, 64)  # ln_pre tokens of mini-clip (32 px, patch 8)
    res = ex.simulator.run()
    assert all(math.isfinite(r["train_loss"]) and 0.0 <= r["acc_mean"] <= 1.0 for r in res.rounds)


def test_group_text_is_the_ctx_init_prompt_and_follows_over_classes(tiny_backbone, runtime):
    """Every group at "a photo" (no noise) equals open_clip's encode_text of "a photo of a {name}."; inside
    ``over_classes`` the groups are encoded over the other class list (base-to-novel), restored on exit."""
    algo = get_algorithm("fedmgp")(runtime, {"groups": 2})
    photo = _ctx_init(tiny_backbone)
    model = FedMGPModel(algo.rt, algo.hp, photo.expand(2, -1, -1), algo.initial_groups()["vis"])

    def ref(names):
        tokens = get_tokenizer(tiny_backbone.name)([f"a photo of a {n}." for n in names])
        with torch.no_grad():
            return F.normalize(tiny_backbone.model.encode_text(tokens).float(), dim=-1)

    with torch.no_grad():
        assert (model.text_features()[1] - ref(["cat", "dog", "bird"])).abs().max() <= 1e-5
        with algo.over_classes(TextEncoder(tiny_backbone, ["fish", "horse"])):
            novel = FedMGPModel(algo.rt, algo.hp, photo.expand(2, -1, -1), algo.initial_groups()["vis"])
            assert algo.rt.text.classnames == ["fish", "horse"]
            assert (novel.text_features()[0] - ref(["fish", "horse"])).abs().max() <= 1e-5
    assert algo.rt.text.classnames == ["cat", "dog", "bird"] and algo.rt.text.fixed == "of a"
    with pytest.raises(ValueError, match="FedMGP"):
        FedMGPModel(runtime, algo.hp, photo.expand(2, -1, -1), algo.initial_groups()["vis"])


def _ctx_init(backbone):
    from fedml_pfedmoap.algorithms.fedmgp import init_text_ctx

    return init_text_ctx(backbone, "a photo")
