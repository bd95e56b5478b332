"""The CoOp text path equals open_clip's encode_text; causal truncation is exact; image features/patches."""
import torch
import torch.nn.functional as F

from fedml_pfedmoap.clip.prompt import TextEncoder

NAMES = ["zero", "ice_cream", "wine glass", "a much longer multi word class name"]


def test_coop_path_equals_encode_text_when_ctx_is_the_x_tokens(tiny_backbone):
    te = TextEncoder(tiny_backbone, NAMES, n_ctx=16, truncate=False)
    ref = tiny_backbone.model.encode_text(te.tokens)
    out = te.features(te.x_ctx)
    assert out.shape == ref.shape == (len(NAMES), tiny_backbone.embed_dim)
    assert torch.equal(out, ref)  # same kernels and shapes: bit-identical


def test_truncation_gives_identical_features(tiny_backbone):
    full = TextEncoder(tiny_backbone, NAMES, n_ctx=16, truncate=False)
    short = TextEncoder(tiny_backbone, NAMES, n_ctx=16, truncate=True)
    eot = full.tokens.argmax(-1)
    assert short.length == int(eot.max()) + 1 < 77
    ctx = torch.randn(3, 16, tiny_backbone.text_width, generator=torch.Generator().manual_seed(1)) * 0.02
    a, b = full.features(ctx), short.features(ctx)
    assert a.shape == (3, len(NAMES), tiny_backbone.embed_dim)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batched_prompts_equal_one_by_one(tiny_backbone):
    te = TextEncoder(tiny_backbone, NAMES, n_ctx=4)
    ctx = torch.randn(2, 3, 4, tiny_backbone.text_width, generator=torch.Generator().manual_seed(2))
    batched = te.features(ctx)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], te.features(ctx[i, j]), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_ctx_only(tiny_backbone):
    te = TextEncoder(tiny_backbone, NAMES, n_ctx=4)
    ctx = torch.zeros(4, tiny_backbone.text_width, requires_grad=True)
    te.features(ctx).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_template_features_match_encode_text(tiny_backbone):
    te = TextEncoder(tiny_backbone, NAMES, n_ctx=4)
    out = te.template_features("a photo of a {}.")
    tokens = te.tokenizer([f"a photo of a {n}." for n in te.classnames])
    ref = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_tokens_are_projected_post_ln_tokens(tiny_backbone):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pooled, patches = tiny_backbone.encode_image(x, patches=True)
    vis = tiny_backbone.model.visual
    torch.testing.assert_close(pooled, tiny_backbone.model.encode_image(x))
    # manual: patch embedding -> transformer -> ln_post on every token, drop the class token, project
    z = vis.conv1(x).flatten(2).transpose(1, 2)
    cls = vis.class_embedding.view(1, 1, -1).expand(2, 1, -1)
    z = torch.cat([cls, z], 1) + vis.positional_embedding
    z = vis.ln_pre(z)
    z = vis.transformer(z)
    z = vis.ln_post(z)
    torch.testing.assert_close(patches, z[:, 1:] @ vis.proj, atol=1e-5, rtol=1e-5)
    assert patches.shape == (2, (32 // 8) ** 2, tiny_backbone.embed_dim)
