import pytest
import torch

from midi_rae.swin import SwinDecoder, SwinEncoder, SwinMAEDecoder, upsample2x
from midi_rae.vit import ViTDecoder, ViTEncoder, ViTMAEDecoder

SMALL = dict(embed_dim=8, depths=(1, 1, 1, 1, 1, 1), num_heads=(1, 1, 2, 4, 8, 16))


def roll(B: int, W: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(B, 1, 128, W)
    x[:, :, 40:90] = (torch.rand(B, 1, 50, W, generator=g) > 0.9).float()
    return x


def randomize_norms(model: torch.nn.Module) -> None:
    """Swin V2 post-norms start at zero; give them weight so every block shapes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


@pytest.mark.parametrize("W", [128, 256])
@pytest.mark.parametrize("make", [
    lambda W: SwinMAEDecoder(128, W),
    lambda W: SwinDecoder(128, W, **SMALL),
    lambda W: SwinDecoder(128, W, **SMALL, head="pixelshuffle"),
    lambda W: SwinDecoder(128, W, **SMALL, head="convtranspose", skip_levels=(1, 3)),
    lambda W: SwinDecoder(128, W, **SMALL, skip_levels=(0, 1), width=16),
], ids=["mae", "swin-linear", "swin-pixelshuffle", "swin-convtranspose-skip", "swin-wider"])
def test_swin_decoders_shapes_and_gradients(W: int, make) -> None:
    enc, dec = SwinEncoder(128, W, **SMALL), make(W)
    randomize_norms(dec)
    out = enc(roll(2, W), mask_ratio=0.5)
    logits = dec(out)
    assert logits.shape == (2, 1, 128, W) and torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    # every decoder parameter is used (1x1-window logit-only parameters aside, see the encoder test)
    unused = [n for n, p in dec.named_parameters() if p.grad is None]
    assert not unused, unused


def test_skip_levels_reads_only_those_levels() -> None:
    enc, dec = SwinEncoder(128, 256, **SMALL), SwinDecoder(128, 256, **SMALL, skip_levels=[0, 2])
    assert sorted(dec.lateral.keys()) == ["0", "2"] and dec.start_token is None
    with torch.no_grad():
        out = enc(roll(1, 256))
        before = dec(out)
        out.patches[3].emb.add_(1.0)  # a level it may not read
        assert torch.equal(before, dec(out))
        out.patches[2].emb.add_(1.0)  # one it reads
        assert not torch.equal(before, dec(out))
    fine_only = SwinDecoder(128, 128, **SMALL, skip_levels=[5])
    assert fine_only.start_token is not None
    with pytest.raises(ValueError, match="skip_levels must name"):
        SwinDecoder(128, 128, **SMALL, skip_levels=[6])


def test_a_wider_decoder_projects_the_encoders_levels_to_its_own_width() -> None:
    """width: the decoder's stages are wider than the encoder's levels; the laterals map one to the other."""
    dec = SwinDecoder(128, 128, **SMALL, skip_levels=[0, 1], width=32)
    assert [tuple(dec.lateral[k].weight.shape) for k in ("0", "1")] == [(32 * 32, 8 * 32), (32 * 16, 8 * 16)]
    assert dec.head.proj.in_features == 32 and dec.norm.normalized_shape == (32,)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SwinDecoder(128, 128, **dict(SMALL, num_heads=(2, 2, 2, 4, 8, 16)), width=9)


def test_mae_decoder_keeps_coarse_context_at_masked_patches() -> None:
    enc, dec = SwinEncoder(128, 128, **SMALL), SwinMAEDecoder(128, 128)
    out = enc(roll(1, 128), mask_ratio=0.75)
    coarse = out.patches[0].emb.detach().requires_grad_(True)
    out.patches.levels[0].emb = coarse
    logits = dec(out)
    masked_pixels = (~out.mae_mask).view(1, 32, 32).repeat_interleave(4, 1).repeat_interleave(4, 2)
    logits[0, 0][masked_pixels[0]].sum().backward()
    assert coarse.grad.abs().sum() > 0  # the global token still reaches masked patches


def test_decoder_rejects_another_encoders_output() -> None:
    out = SwinEncoder(128, 256, **SMALL)(roll(1, 256))
    with pytest.raises(ValueError, match="built for levels"):
        SwinDecoder(128, 128, **SMALL)(out)
    with pytest.raises(ValueError, match="unknown head"):
        SwinDecoder(128, 128, **SMALL, head="bilinear")


@pytest.mark.parametrize("make", [ViTDecoder, ViTMAEDecoder])
def test_vit_decoders(make) -> None:
    enc = ViTEncoder(128, 256, embed_dim=64, depth=1, num_heads=4)
    dec = make(128, 256, embed_dim=64)
    out = enc(roll(2, 256), mask_ratio=0.5)
    logits = dec(out)
    assert logits.shape == (2, 1, 128, 256) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None for p in dec.parameters())
    with pytest.raises(ValueError, match="ViTEncoder output"):
        dec(SwinEncoder(128, 256, **SMALL)(roll(1, 256)))


def test_upsample2x_copies_each_token_to_its_cell() -> None:
    """Nearest 2x upsampling of an NHWC grid: each token on its 2 x 2 cell, and the gradient of a
    token the sum over its cell; the output is a plain contiguous NHWC tensor."""
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = upsample2x(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, x.repeat_interleave(2, 1).repeat_interleave(2, 2), rtol=0, atol=0)
    g = torch.randn(2, 6, 10, 4)
    y.backward(g)
    torch.testing.assert_close(x.grad, g.view(2, 3, 2, 5, 2, 4).sum((2, 4)))
