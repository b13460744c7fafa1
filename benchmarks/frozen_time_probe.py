"""Would a time stage help a trained encoder? A quick test on a frozen run, before pretraining one.

Every level's column means (`PatchState.column_means`, repeated to the finest grid's columns and
concatenated) of a frozen run's encoder, on crops of the training works (`--side-crops-per-piece`
per piece), feed a small Transformer over the columns (learned positions, `--dim` wide, 2 layers,
4 heads) whose mean token regresses the crops' standardised descriptors (rhythm features weighted
4x) for `--steps` steps; then the probe suite's tasks (same crops, split and L2 choice as `midi-rae
probe`, 2 crops per piece) on 'all non-empty + self-sim', on the module's mean token ('side
hidden'), on its predicted descriptors, and on the first two concatenated. The test works are never
seen by the module. This is the offline counterpart of `swin.TimeStage` (which differs in its
sinusoidal positions and is trained beside the pyramid during pretraining); see
benchmarks/RESULTS.md, "fourteenth pass" and "fifteenth pass".

`--inputs roll` gives the module the roll's own counts per time step instead of the levels'
profiles (the notes sounding and starting: every onset the rhythm descriptors read), `both` the two.
`--side-crops later-tiles` trains on the 3rd to 8th tiles of each training piece with at least 4
(never the probe's kind of crop, the first two), grouped by piece, so that `--piece-weight` can
add a same-piece InfoNCE (SimCLR's loss on an MLP projection of the mean token; two tiles of one
piece are a positive pair, the other pieces of the batch the negatives) to the descriptor loss
(`--descriptor-weight`, 0 for the contrastive loss alone). `--module autocorr` swaps the Transformer
for `AutocorrSide`: learned per-column signals and their autocorrelations, the offline counterpart of
`swin.AutocorrTimeStage` (benchmarks/RESULTS.md, "sixteenth pass").

    PYTHONPATH=. python benchmarks/frozen_time_probe.py runs/RUN --cache-dir CACHE --steps 4000 --dim 128
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from midi_rae.cache import load_index, piece_work, split_of
from midi_rae.descriptors import RHYTHM, descriptors
from midi_rae.labels import find_tasks, piece_crops
from midi_rae.losses import info_nce
from midi_rae.probes import L2_GRID, level_features, probe_task
from midi_rae.runs import datasets, load_encoder
from midi_rae.swin import lagged_autocorrelation, level_profiles


class Side(nn.Module):
    """Column profiles (B, cols, D_levels + D_counts) -> mean token (B, d) -> descriptors. The levels'
    means are layer-normalised per column; the roll's counts enter as log(1 + count): normalising a
    column of a few counts would make a silent column and one full of onsets alike."""

    def __init__(self, d_levels: int, d_counts: int, cols: int, d: int, n_out: int) -> None:
        super().__init__()
        self.d_levels = d_levels
        self.norm_in = nn.LayerNorm(d_levels) if d_levels else nn.Identity()
        self.inp = nn.Linear(d_levels + d_counts, d)
        self.pos = nn.Parameter(torch.zeros(1, cols, d))
        self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2 * d, 0.0, batch_first=True, norm_first=True),
                                          2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, n_out)

    def pooled(self, p: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm_in(p[..., :self.d_levels]), p[..., self.d_levels:].log1p()], -1)
        return self.norm(self.body(self.inp(x) + self.pos)).mean(1)


class AutocorrSide(nn.Module):
    """Column profiles (B, cols, D_levels + D_counts) -> `channels` soft onset-like signals per
    column (a per-column MLP, sigmoid) -> their autocorrelations at lags 1..`lags` columns, each
    divided by its energy as the descriptors' onset autocorrelation is -> mean token (B, d). The
    lagged products a regression has to approximate are computed here exactly; what is learned is
    which signals to correlate."""

    def __init__(self, d_levels: int, d_counts: int, cols: int, d: int, n_out: int, channels: int = 16,
                 lags: int = 32) -> None:
        super().__init__()
        self.d_levels, self.lags = d_levels, lags
        self.norm_in = nn.LayerNorm(d_levels) if d_levels else nn.Identity()
        self.signal = nn.Sequential(nn.Linear(d_levels + d_counts, d), nn.GELU(), nn.Linear(d, channels))
        self.inp = nn.Linear(channels * (lags + 1), d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, n_out)

    def pooled(self, p: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm_in(p[..., :self.d_levels]), p[..., self.d_levels:].log1p()], -1)
        g = torch.sigmoid(self.signal(x))  # (B, cols, C)
        ac = lagged_autocorrelation(g, self.lags)  # (B, C, lags)
        return self.norm(self.inp(torch.cat([ac, g.mean(1, keepdim=True).transpose(1, 2)], -1).flatten(1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--side-crops-per-piece", type=int, default=2)
    p.add_argument("--side-crops", choices=["piece-starts", "pretraining", "later-tiles"], default="piece-starts",
                   help="the module's training crops: the first windows of each training piece, as the probe "
                        "cuts its own (phase-aligned with the probe's crops), as many drawn as pretraining "
                        "draws them (the run's training dataset), or the 3rd to 8th tiles, grouped by piece")
    p.add_argument("--descriptor-weight", type=float, default=1.0)
    p.add_argument("--piece-weight", type=float, default=0.0,
                   help="--side-crops later-tiles: same-piece InfoNCE between two tiles of each piece of a batch")
    p.add_argument("--crop-starts", choices=["any", "tiles"], default="any",
                   help="--side-crops pretraining: the dataset's data.crop_starts")
    p.add_argument("--inputs", choices=["levels", "roll", "both"], default="levels",
                   help="what the module reads a column of: the levels' column means, the roll's own counts "
                        "(sounding and onset pitches at each of the column's time steps, every channel), or both")
    p.add_argument("--module", choices=["transformer", "autocorr"], default="transformer",
                   help="the side module: a Transformer over the columns (`Side`), or learned signals and "
                        "their autocorrelations (`AutocorrSide`)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    index = load_index(args.cache_dir)
    tasks = find_tasks(index, 0.05, None, None, 20, 4, 8, 150)
    crops = piece_crops(args.cache_dir, [p for t in tasks for p in t.train + t.test], 128, 2)
    train_pieces = [p for p in index if split_of(piece_work(p), 0.05) != "val"]
    groups: list[list[int]] = []  # --side-crops later-tiles: the rows of side_x of each piece
    if args.side_crops == "later-tiles":
        xs, n = [], 0
        for c0 in range(0, len(train_pieces), 500):  # in chunks: 8 tiles of every piece at once would not fit in memory
            part = piece_crops(args.cache_dir, train_pieces[c0:c0 + 500], 128, 8)
            for rows in part.by_piece.values():
                if len(rows) >= 4:
                    xs.append(part.x[rows[2:]])
                    groups.append(list(range(n, n + len(rows) - 2)))
                    n += len(rows) - 2
        side_x = torch.cat(xs)
        del xs, part
    else:
        side_x = piece_crops(args.cache_dir, train_pieces, 128, args.side_crops_per_piece).x  # training works only
    if args.piece_weight and not groups:
        p.error("--piece-weight needs --side-crops later-tiles (crops grouped by piece)")
    assert not ({p["piece_id"] for t in tasks for p in t.test} & {p["piece_id"] for p in train_pieces})
    enc, cfg = load_encoder(args.run)
    if args.side_crops == "pretraining":  # the same number of crops, drawn by the run's training dataset
        cfg.data.cache_dir, cfg.data.crop_starts = args.cache_dir, args.crop_starts
        train, _ = datasets(cfg, 0, False)
        side_x = torch.stack([train[i]["x"] for i in torch.randint(len(train), (len(side_x),)).tolist()])
    print("probe crops", len(crops.x), "side crops", len(side_x), flush=True)
    enc.eval()
    cols = enc.grid_size[1]

    @torch.inference_mode()
    def profiles(x: torch.Tensor, bs: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(x), bs):
            xb, parts = x[i:i + bs, :enc.in_chans], []
            if args.inputs != "roll":
                parts.append(level_profiles(enc(xb).patches).float())  # (b, cols, sum of the levels' dims)
            if args.inputs != "levels":  # (b, cols, C * steps a column): notes sounding / starting at each step
                b, c, _, t = xb.shape
                parts.append(xb.float().sum(2).reshape(b, c, cols, t // cols).permute(0, 2, 1, 3).reshape(b, cols, -1))
            out.append(torch.cat(parts, -1))
        return torch.cat(out)  # (N, cols, features of a column)

    t0 = time.time()
    p_side, p_probe = profiles(side_x), profiles(crops.x)
    d_side = descriptors(side_x)
    y = (d_side - d_side.mean(0)) / d_side.std(0).clamp_min(1e-6)
    w = torch.ones(y.shape[1])
    w[RHYTHM] = 4.0
    print("profiles", tuple(p_side.shape), f"{time.time() - t0:.0f}s", flush=True)

    d_levels = sum(i.dim for i in enc.feature_info) if args.inputs != "roll" else 0
    side = (Side if args.module == "transformer" else AutocorrSide)(d_levels, p_side.shape[-1] - d_levels, cols,
                                                                    args.dim, y.shape[1])
    params = list(side.parameters())
    if args.piece_weight:  # the InfoNCE's projector (built only then: the other runs draw the same numbers as before)
        proj = nn.Sequential(nn.Linear(args.dim, args.dim), nn.GELU(), nn.Linear(args.dim, 64))
        params += proj.parameters()
    opt = torch.optim.AdamW(params, 1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps, pct_start=0.05)
    for s in range(args.steps):
        if args.piece_weight:  # 64 pieces, two of their tiles each: (128,), pairs i and i + 64
            pairs = [torch.tensor(groups[g])[torch.randperm(len(groups[g]))[:2]]
                     for g in torch.randint(len(groups), (64,)).tolist()]
            idx = torch.cat([torch.stack([q[0] for q in pairs]), torch.stack([q[1] for q in pairs])])
        else:
            idx = torch.randint(len(p_side), (64,))
        shift = int(torch.randint(0, 8, ()))  # a little time shift
        hid = side.pooled(torch.roll(p_side[idx], shift, 1))
        loss = args.descriptor_weight * (((side.out(hid) - y[idx]) ** 2) * w).mean()
        if args.piece_weight:
            z1, z2 = proj(hid).chunk(2)
            loss = loss + args.piece_weight * info_nce(z1, z2, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s % 500 == 0:
            print(s, f"{loss.item():.4f}", f"{time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        hid = side.pooled(p_probe)
        pred = side.out(hid)
    base = level_features(enc, crops.x[:, :enc.in_chans])["all non-empty + self-sim"]
    sets = {"run": {"all non-empty + self-sim": base, "side hidden": hid, "side predicted": pred,
                    "all + side hidden": torch.cat([base, hid], 1)},
            "descriptors": {"hand-crafted": descriptors(crops.x)}}
    for task in tasks:
        res = probe_task(task, crops, sets, L2_GRID)
        print(f"\n{task.name}: {res['train_crops']} training crops, {res['test_crops']} test crops")
        for r in res["rows"]:
            print(f"| {r['model']} | {r['features']} | {r['dim']} | {r['balanced_accuracy']:.3f} |"
                  + (" headline |" if r.get("headline") else " |"))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
