"""Base-to-novel end to end (docs/algorithms.md §Base-to-novel): composition, per-method novel scoring with the novel
class names only (every registered algorithm), hand-computed Local / Base / Novel / HM, config validation."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedml_pfedmoap.algorithms import ALGORITHMS
from fedml_pfedmoap.clip import towers
from fedml_pfedmoap.clip.prompt import TextEncoder
from fedml_pfedmoap.config import ConfigError, validate
from fedml_pfedmoap.federated import base2novel_eval


def _b2n(cfg, rounds=1):
    cfg.data_args.protocol = "base2novel"
    cfg.data_args.shots = 4
    cfg.train_args.client_num_in_total = cfg.train_args.client_num_per_round = 5
    cfg.train_args.comm_round = rounds
    return cfg


def _nine_digits(digits):
    """digits without "nine": N = 9, so base (zero..four) and novel (five..eight) differ in size."""
    from fedml_pfedmoap.data.base import ArraySplit, ImageDataset

    def cut(split):
        keep = split.labels < 9
        return ArraySplit(split.images[keep], split.labels[keep], "digits9")

    return ImageDataset("digits", digits.classnames[:9], cut(digits.train), cut(digits.test), template=digits.template)


@pytest.mark.parametrize("name", sorted(ALGORITHMS.names()))
def test_novel_evaluation_sees_only_novel_names(quick_cfg, digits, monkeypatch, name):
    """Every text-tower call made while the engine scores the novel test set (the CoOp path's ``TextEncoder._run`` and
    the split tower's tokenized fixed prompts) encodes novel class names only, and there is at least one (a method
    reusing base-class features would make none). Halves of unequal size (5 / 4)."""
    from fedml_pfedmoap.experiment import Resources, build_experiment

    res = Resources()
    monkeypatch.setattr(res, "dataset", lambda cfg: _nine_digits(digits))
    exp = build_experiment(_b2n(quick_cfg), name, resources=res, progress=False)
    ev = exp.simulator.base2novel
    assert len(ev.novel_text.classnames) == 4 and len(exp.algorithm.rt.text.classnames) == 5
    novel = set(ev.novel_text.classnames)
    base = set(exp.algorithm.rt.text.classnames)
    assert novel and base and not novel & base
    phase, seen, prompts = {"novel": False}, [], []
    run, scores, tokenize = TextEncoder._run, base2novel_eval._scores, towers._tokenize

    def spy_run(self, *a, **k):
        if phase["novel"]:
            seen.append(tuple(self.classnames))
        return run(self, *a, **k)

    def spy_tokenize(model_name, texts):  # the split text tower's fixed prompts (pFedMMA)
        if phase["novel"]:
            prompts.extend(texts)
        return tokenize(model_name, texts)

    def spy_scores(algo, payloads, states, data):
        phase["novel"] = data is ev.novel_test
        try:
            return scores(algo, payloads, states, data)
        finally:
            phase["novel"] = False

    monkeypatch.setattr(TextEncoder, "_run", spy_run)
    monkeypatch.setattr(base2novel_eval, "_scores", spy_scores)
    monkeypatch.setattr(towers, "_tokenize", spy_tokenize)
    m = exp.simulator.run_round(0)
    assert seen or prompts, f"{name}: no text-tower call during the novel evaluation"
    leaked = {c for names in seen for c in names} - novel
    leaked |= {b for b in base for p in prompts if re.search(rf"\b{re.escape(b)}\b", p)}
    assert not prompts or any(re.search(rf"\b{re.escape(n)}\b", p) for n in novel for p in prompts)
    assert not leaked, f"{name}: base class names {sorted(leaked)} reached the novel evaluation"
    assert {"acc_local", "acc_base", "acc_novel", "acc_hm"} <= set(m)
    assert m["acc_local"] == pytest.approx(m["acc_mean"])


def _hand_acc(feats, labels, text):
    logits = F.normalize(feats.float(), dim=-1) @ text.t()
    return float((logits.argmax(-1) == labels).float().mean())


def test_zeroshot_local_base_novel_by_hand(quick_cfg, digits):
    """Zero-shot CLIP: Local / Base / Novel against a hand-written cosine argmax over each half's names; HM by hand."""
    from fedml_pfedmoap.experiment import Resources, build_experiment

    res = Resources()
    cfg = _b2n(quick_cfg)
    exp = build_experiment(cfg, "zeroshot", resources=res, progress=False)
    m = exp.simulator.run_round(0)
    backbone = next(iter(res.backbones.values()))
    test = res.split_features(cfg, backbone, digits, "test", False, torch.device("cpu"))
    labels = digits.test.labels
    base_ids, novel_ids = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    names = [c for c in digits.classnames]
    tpl = digits.template
    t_base = TextEncoder(backbone, [names[i] for i in base_ids]).template_features(tpl)
    t_novel = TextEncoder(backbone, [names[i] for i in novel_ids]).template_features(tpl)
    in_base = np.isin(labels, base_ids)
    in_novel = np.isin(labels, novel_ids)
    base = _hand_acc(test.feats[in_base], torch.as_tensor(labels[in_base]), t_base)
    novel = _hand_acc(test.feats[in_novel], torch.as_tensor(labels[in_novel] - 5), t_novel)
    local = []
    for cls in exp.partition.test:  # each client's own base classes' test items
        own = np.isin(np.arange(len(labels)), cls)
        local.append(_hand_acc(test.feats[own], torch.as_tensor(labels[own]), t_base))
    assert sorted(len(set(labels[c].tolist())) for c in exp.partition.test) == [1] * 5  # one base class each
    assert m["acc_base"] == pytest.approx(base, abs=1e-6)
    assert m["acc_novel"] == pytest.approx(novel, abs=1e-6)
    assert m["acc_local"] == pytest.approx(float(np.mean(local)), abs=1e-6)
    hm = 3.0 / (1.0 / m["acc_local"] + 1.0 / m["acc_base"] + 1.0 / m["acc_novel"])
    assert m["acc_hm"] == pytest.approx(hm, rel=1e-12)
    assert not math.isclose(m["acc_novel"], m["acc_base"])  # the two halves really are scored apart


def test_label_shift_has_no_base2novel_metrics(quick_cfg):
    from fedml_pfedmoap.experiment import build_experiment

    exp = build_experiment(quick_cfg, "zeroshot", progress=False)
    assert exp.simulator.base2novel is None
    assert "acc_base" not in exp.simulator.run_round(0)


@pytest.mark.parametrize("key,value,msg", [
    ("protocol", "novel", "data_args.protocol"),
    ("base2novel_convention", "names", "data_args.base2novel_convention"),
])
def test_bad_values_name_the_key(quick_cfg, key, value, msg):
    setattr(quick_cfg.data_args, key, value)
    with pytest.raises(ConfigError, match=msg):
        validate(quick_cfg)


def test_legacy_needs_label_id(quick_cfg):
    quick_cfg.data_args.protocol = "base2novel"
    quick_cfg.data_args.base2novel_convention = "flip"
    quick_cfg.data_args.base2novel_legacy = True
    with pytest.raises(ConfigError, match="data_args.base2novel_legacy"):
        validate(quick_cfg)


def test_flip_scores_the_global_model_by_hand(quick_cfg, digits):
    """flip, zero-shot: Base / Novel over the sorted-name halves against a hand-written cosine argmax; 2-way HM."""
    from fedml_pfedmoap.experiment import Resources, build_experiment

    res = Resources()
    cfg = _b2n(quick_cfg)
    cfg.data_args.base2novel_convention = "flip"
    cfg.data_args.min_size = 2
    exp = build_experiment(cfg, "zeroshot", resources=res, progress=False)
    m = exp.simulator.run_round(0)
    backbone = next(iter(res.backbones.values()))
    test = res.split_features(cfg, backbone, digits, "test", False, torch.device("cpu"))
    labels = digits.test.labels
    order = sorted(range(10), key=lambda j: digits.classnames[j])  # eight five four nine one | seven six three two zero
    halves = order[:5], order[5:]
    accs = []
    for ids in halves:
        text = TextEncoder(backbone, [digits.classnames[i] for i in ids]).template_features(digits.template)
        keep = np.isin(labels, ids)
        local = torch.as_tensor([ids.index(int(y)) for y in labels[keep]])
        accs.append(_hand_acc(test.feats[keep], local, text))
    assert [digits.classnames[i] for i in halves[0]] == ["eight", "five", "four", "nine", "one"]
    assert m["acc_base"] == pytest.approx(accs[0], abs=1e-6)
    assert m["acc_novel"] == pytest.approx(accs[1], abs=1e-6)
    assert m["acc_hm"] == pytest.approx(2.0 / (1.0 / accs[0] + 1.0 / accs[1]), rel=1e-6)
    assert "acc_local" not in m


@pytest.mark.parametrize("name", sorted(ALGORITHMS.names()))
def test_flip_round_runs_for_every_algorithm(quick_cfg, name):
    from fedml_pfedmoap.experiment import build_experiment

    cfg = _b2n(quick_cfg)
    cfg.data_args.base2novel_convention = "flip"
    cfg.data_args.min_size = 2
    m = build_experiment(cfg, name, progress=False).simulator.run_round(0)
    assert 0.0 <= m["acc_novel"] <= 1.0 and 0.0 <= m["acc_base"] <= 1.0
    assert m["acc_hm"] == pytest.approx(2.0 / (1.0 / m["acc_base"] + 1.0 / m["acc_novel"]), rel=1e-12)


@pytest.mark.fedml
def test_cross_silo_rejects_base2novel_naming_the_key(quick_cfg):
    from types import SimpleNamespace

    from fedml_pfedmoap.fedml_plugin.cross_silo import run_cross_silo

    quick_cfg.data_args.protocol = "base2novel"
    with pytest.raises(ConfigError, match="data_args.protocol"):
        run_cross_silo(SimpleNamespace(cfg=quick_cfg), SimpleNamespace(rank=0, worker_num=1))
