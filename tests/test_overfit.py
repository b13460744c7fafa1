"""Behaviour test with a step budget: encoder + SwinDecoder memorise one batch of real music."""
from pathlib import Path

import music21
import numpy as np
import torch
import torch.nn.functional as F

from midi_rae.roll import midi_to_roll
from midi_rae.swin import SwinDecoder, SwinEncoder

WHEEL = Path(music21.__file__).parent
FILES = ["omr/k525MIDIMvt1.mid", "midi/testPrimitive/test04.mid"]  # MIDI files shipped in the music21 wheel


def real_batch() -> torch.Tensor:
    """(4, 1, 128, 128): two 128-step crops (frame channel) from each of two real pieces."""
    rolls = [midi_to_roll(WHEEL / f) for f in FILES]
    crops = [r[:1, :, s : s + 128] for r in rolls for s in (0, r.shape[-1] // 3)]
    return torch.from_numpy(np.stack(crops).astype(np.float32))


def pixel_f1(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred, true = logits > 0, target > 0.5
    return float(2 * (pred & true).sum() / (pred.sum() + true.sum()))


def test_encoder_and_decoder_overfit_one_batch() -> None:
    torch.manual_seed(0)
    x = real_batch()
    assert 0.01 < x.mean() < 0.1  # sparse, as piano rolls are
    cfg = dict(img_height=128, img_width=128, embed_dim=16, depths=(1,) * 6, num_heads=(1, 1, 2, 4, 8, 16),
               drop_path_rate=0.0)
    enc, dec = SwinEncoder(**cfg), SwinDecoder(**cfg)
    with torch.no_grad():  # start the logits at the data's prior (RetinaNet, https://arxiv.org/abs/1708.02002)
        p = x.mean()
        dec.head.proj.bias.fill_(float(torch.log(p / (1 - p))))
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], lr=5e-3, weight_decay=0.0)
    f1, step = 0.0, 0
    for step in range(1, 301):
        logits = dec(enc(x))
        loss = F.binary_cross_entropy_with_logits(logits, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            f1 = pixel_f1(logits.detach(), x)
            if f1 >= 0.95:
                break
    assert f1 >= 0.95, f"pixel F1 {f1:.3f} after {step} steps"
