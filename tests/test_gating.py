"""pFedMoAP gate (docs/algorithms.md §pFedMoAP) against hand-written per-class / per-head loops."""
import math

import pytest
import torch

from fedml_pfedmoap.gating import (AttentionGate, LinearGate, build_gate, moe_logits, num_parameters, pool_features,
                                   resolve_d_gating)


def _lin(layer, x):
    """y = W x + b for one vector, as an explicit sum."""
    w, b = layer.weight, layer.bias
    return torch.stack([sum(w[o, i] * x[i] for i in range(len(x))) + b[o] for o in range(w.shape[0])])


def reference_attention(gate: AttentionGate, q: torch.Tensor, kv: torch.Tensor, scale: float = 10.0,
                        uniform: bool = False):
    """Loop over classes c, images b, heads h and experts e; softmax written out."""
    c_n, e_n, d = kv.shape
    b_n, h_n = q.shape[0], 8
    dh = d // h_n
    out = torch.zeros(c_n, b_n, d)
    att = torch.zeros(c_n, b_n, e_n)
    for c in range(c_n):
        keys = [gate.k_proj.weight @ kv[c, e] + gate.k_proj.bias for e in range(e_n)]
        vals = [gate.v_proj.weight @ kv[c, e] + gate.v_proj.bias for e in range(e_n)]
        for b in range(b_n):
            qq = gate.q_proj.weight @ q[b] + gate.q_proj.bias
            heads = []
            for h in range(h_n):
                sl = slice(h * dh, (h + 1) * dh)
                if uniform:
                    w = [1.0 / e_n] * e_n
                else:
                    s = [scale * float(torch.dot(qq[sl], keys[e][sl])) for e in range(e_n)]
                    m = max(s)
                    z = sum(math.exp(x - m) for x in s)
                    w = [math.exp(x - m) / z for x in s]
                heads.append(sum(w[e] * vals[e][sl] for e in range(e_n)))
                for e in range(e_n):
                    att[c, b, e] += w[e] / h_n
            out[c, b] = gate.out_proj.weight @ torch.cat(heads) + gate.out_proj.bias
    return out, att


def _inputs(b=3, c=4, e=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(c, e, d, generator=g)


@pytest.mark.parametrize("d", [128, 32, 64])
def test_parameter_count(d):
    gate = AttentionGate(d)
    assert num_parameters(gate) == 4 * (d * d + d)
    if d == 128:
        assert num_parameters(gate) == 66_048
    assert not any(isinstance(m, torch.nn.Dropout) for m in gate.modules())


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("e", [1, 2, 5])
def test_attention_matches_reference_loop(e, uniform):
    gate = AttentionGate(16, generator=torch.Generator().manual_seed(3), uniform=uniform)
    q, kv = _inputs(e=e)
    out, att = gate(q, kv)
    ref_out, ref_att = reference_attention(gate, q, kv, uniform=uniform)
    assert out.shape == (4, 3, 16) and att.shape == (4, 3, e)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att, ref_att, atol=1e-5, rtol=1e-5)


def test_scale_is_ten_not_inverse_sqrt():
    gate = AttentionGate(16, generator=torch.Generator().manual_seed(3))
    q, kv = _inputs()
    ref_10, _ = reference_attention(gate, q, kv, scale=10.0)
    ref_std, _ = reference_attention(gate, q, kv, scale=1 / math.sqrt(2))
    out, _ = gate(q, kv)
    torch.testing.assert_close(out, ref_10, atol=1e-5, rtol=1e-5)
    assert (out - ref_std).abs().max() > 1e-3


def test_expert_permutation_invariance():
    gate = AttentionGate(16, generator=torch.Generator().manual_seed(1))
    q, kv = _inputs(e=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out, att = gate(q, kv)
    out_p, att_p = gate(q, kv[:, perm])
    torch.testing.assert_close(out, out_p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(att[..., perm], att_p, atol=1e-6, rtol=1e-5)


def test_private_init_is_seeded_and_pytorch_default():
    a = AttentionGate(32, generator=torch.Generator().manual_seed(7))
    b = AttentionGate(32, generator=torch.Generator().manual_seed(7))
    c = AttentionGate(32, generator=torch.Generator().manual_seed(8))
    for (na, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), na
        assert not torch.equal(pa, pc), na
        assert float(pa.abs().max()) <= 1 / math.sqrt(32) + 1e-7  # U(±1/√fan_in), as torch.nn.Linear


def test_pooling_is_strided_without_renormalization():
    z = torch.nn.functional.normalize(torch.randn(2, 3, 1024, generator=torch.Generator().manual_seed(0)), dim=-1)
    p = pool_features(z, 128)
    ref = torch.stack([z[..., 8 * i] for i in range(128)], dim=-1)  # RN50: dims 0, 8, 16, ...
    assert torch.equal(p, ref)
    assert (p.norm(dim=-1) - 1).abs().min() > 0.1  # not re-normalized
    assert torch.equal(pool_features(z[..., :512], 128), torch.stack([z[..., 4 * i] for i in range(128)], -1))


def test_resolve_d_gating():
    assert resolve_d_gating(1024, None) == 128
    assert resolve_d_gating(512, None) == 128
    assert resolve_d_gating(32, None) == 32  # tiny test model
    assert resolve_d_gating(1024, 256) == 256
    with pytest.raises(ValueError, match="d_gating"):
        resolve_d_gating(32, 24)
    with pytest.raises(ValueError, match="d_gating"):
        resolve_d_gating(32, 64)


def test_linear_gate_matches_reference_loop():
    gate = LinearGate(16, num_experts=4, generator=torch.Generator().manual_seed(2))
    q, kv = _inputs(e=3)
    out, att = gate(q, kv)
    for b in range(3):
        logits = _lin(gate.proj, q[b])[:3]  # only the filled slots
        w = [math.exp(float(x)) for x in logits]
        w = [x / sum(w) for x in w]
        for c in range(4):
            ref = sum(w[e] * kv[c, e] for e in range(3))
            torch.testing.assert_close(out[c, b], ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(att[c, b], torch.tensor(w), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="slots"):
        gate(q, torch.randn(4, 5, 16))


@pytest.mark.parametrize("lam", [0.5, 0.0, 2.0])
def test_moe_logits_match_reference_loop(lam):
    g = torch.Generator().manual_seed(5)
    b_n, c_n, k, dim, d = 3, 4, 2, 64, 16
    img = torch.nn.functional.normalize(torch.randn(b_n, dim, generator=g), dim=-1)
    local = torch.nn.functional.normalize(torch.randn(c_n, dim, generator=g), dim=-1)
    experts = torch.nn.functional.normalize(torch.randn(k, c_n, dim, generator=g), dim=-1)
    gate = AttentionGate(d, generator=g)
    s = torch.tensor(100.0)
    logits, att = moe_logits(img, local, experts, gate, s, lam, d)
    r = dim // d
    q = torch.stack([img[:, r * i] for i in range(d)], -1)
    kv = torch.stack([torch.stack([local[c, ::r]] + [experts[j, c, ::r] for j in range(k)]) for c in range(c_n)])
    t_moe, _ = reference_attention(gate, q, kv)
    for b in range(b_n):
        for c in range(c_n):
            cos = float(torch.dot(img[b], local[c]))
            ref = lam * cos + float(torch.dot(q[b], t_moe[c, b]))  # logits / s
            assert abs(float(logits[b, c]) / 100.0 - ref) <= 1e-5
    assert att.shape == (c_n, b_n, k + 1)


def test_no_experts_gives_plain_scaled_cosine_without_lambda():
    g = torch.Generator().manual_seed(6)
    img = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    local = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    gate = AttentionGate(32, generator=g)
    for experts, gt in [(None, gate), (torch.zeros(0, 5, 32), gate), (torch.randn(2, 5, 32), None)]:
        logits, att = moe_logits(img, local, experts, gt, torch.tensor(50.0), 0.5, 32)
        for b in range(3):
            for c in range(5):
                assert abs(float(logits[b, c]) - 50.0 * float(torch.dot(img[b], local[c]))) < 1e-4
        assert att is None


def test_build_gate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="gating"):
        build_gate("conv", 16, 4)
    assert isinstance(build_gate("linear", 16, 4), LinearGate)
