"""Effective rank of each level's non-empty tokens, a run's encoder beside its random twin.

    PYTHONPATH=. python benchmarks/effective_rank.py runs/ref_n82sda_s0 runs/ref_n82sdai02_s0 --cache-dir CACHE2

The effective rank (Roy & Vetterli, 2007) is exp of the entropy of the centred tokens' spectrum
(energy shares of the singular values): the level's dim for isotropic tokens, about r for tokens
spread evenly over r directions, near 1 for a collapsed level. On the first 256 validation crops
of the run's config (`data.val_max_items` spread over the validation split), levels 0..2
(coarsest first). `midi-rae levels` reports the related count of components holding 90 % of the
variance; benchmarks/RESULTS.md, "ninth pass", has both.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from midi_rae.runs import datasets, initial_encoder, load_encoder, pretraining_config, resolve_checkpoint


def effective_rank(z: Tensor) -> float:
    """exp(entropy of the energy shares of the singular values of z (N, D), centred)."""
    s2 = torch.linalg.svdvals(z.double() - z.double().mean(0)).square()
    p = s2 / s2.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


@torch.inference_mode()
def level_ranks(encoder: nn.Module, x: Tensor, levels: int = 3) -> list[str]:
    out = encoder(x).patches
    return [f"L{j} dim {lvl.dim}: {effective_rank(lvl.emb.float()[lvl.non_empty]):.1f}" for j, lvl in enumerate(out[:levels])]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--crops", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        encoder, cfg = load_encoder(run)
        cfg.data.cache_dir = args.cache_dir
        _, val = datasets(cfg, 0, False)
        x = torch.stack([val[i]["x"] for i in range(min(args.crops, len(val)))])
        print(run, "trained:", "; ".join(level_ranks(encoder, x)))
        print(run, "random twin:", "; ".join(level_ranks(initial_encoder(pretraining_config(resolve_checkpoint(run))), x)))
