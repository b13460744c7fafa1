"""Do second-order poolings of the embeddings close the probe suite's gaps to the descriptors?

The descriptor baseline wins time signature through the onset autocorrelation, a second-order
statistic in time; the probe suite's best pooling adds one second-order statistic per level (the
time self-similarity of column embeddings, `probes.time_self_similarity`). This runs the suite
(`probes.probe`, same crops, split, hold-out choice of the headline feature set) with two more
generic poolings appended to 'all non-empty + self-sim':

- '+ chan-ac': per channel, the autocorrelation of the finest level's column means at every lag
  1 .. cols / 2 (centred, divided by the channel's variance): the channel-wise counterpart of the
  self-similarity, where that one averages the channels into one cosine.
- '+ std': every level's standard deviation over its non-empty tokens (statistics pooling).

    PYTHONPATH=. python benchmarks/probe_poolings.py runs/A [runs/B ...] --cache-dir CACHE

Each run is read with its random-initialisation twin, as the suite does; prints every row.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from midi_rae import probes
from midi_rae.core import PatchState

suite_features = probes.level_features


def channel_autocorrelation(lvl: PatchState) -> Tensor:
    """(B, cols // 2 * D): per channel, the normalised autocorrelation of the column means over time."""
    col = lvl.column_means().float()
    col = col - col.mean(1, keepdim=True)
    var = col.square().mean(1).clamp_min(1e-6)  # (B, D)
    lags = range(1, col.shape[1] // 2 + 1)
    return torch.stack([(col[:, lag:] * col[:, :-lag]).mean(1) / var for lag in lags], 1).flatten(1)


def std_pooling(lvl: PatchState) -> Tensor:
    """(B, D): the standard deviation of the level's non-empty tokens."""
    keep = lvl.non_empty[..., None].float()
    n = keep.sum(1).clamp_min(1)
    mean = (lvl.emb * keep).sum(1) / n
    return (((lvl.emb - mean[:, None]) ** 2 * keep).sum(1) / n).sqrt()


@torch.inference_mode()
def level_features(encoder: nn.Module, x: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """The suite's feature sets plus the two poolings above (appended to its best one)."""
    feats = suite_features(encoder, x, batch_size)
    ac, sd = [], []
    for i in range(0, len(x), batch_size):
        levels = list(encoder(x[i:i + batch_size]).patches)  # coarsest first
        ac.append(channel_autocorrelation(levels[-1]))
        sd.append(torch.cat([std_pooling(lvl) for lvl in levels], 1))
    base = feats["all non-empty + self-sim"]
    feats["all non-empty + self-sim + chan-ac"] = torch.cat([base, torch.cat(ac)], 1)
    feats["all non-empty + self-sim + std"] = torch.cat([base, torch.cat(sd)], 1)
    return feats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--crops-per-piece", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    probes.level_features = level_features  # what `probes.probe` encodes every crop with
    start = time.time()
    result = probes.probe(args.runs, args.cache_dir, level="all", crops_per_piece=args.crops_per_piece)
    for task in result["tasks"]:
        print(task["task"])
        for r in task["rows"]:
            print(f"   {r['model'][:40]:40s} {r['features']:38s} dim {r['dim']:5d} "
                  f"hold-out {r.get('holdout_bacc', float('nan')):.3f} test bacc {r['balanced_accuracy']:.3f}"
                  + (" (headline)" if r.get("headline") else ""))
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
