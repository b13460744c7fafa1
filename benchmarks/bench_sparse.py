"""Compute that follows the notes: the Swin blocks' constant-window path (`SwinBlock._sparse_forward`)
against the dense path, on real crops, in one process (issue 12, item 3).

For each collection (folk songs: one voice; Bach chorales: four) and each preset's encoder, the
same crops go through the encoder with every block forced dense and forced sparse, alternating
`--rounds` times, and through the automatic choice (`sparse=None`: sparse on the CPU where at
least `sparse_min_share` of a block's windows are constant). Timed: inference (eval mode, no
grad: `encode`, `probe`, `eval`) and a training forward + backward with nothing masked (the
SimMIM mask puts a mask token into most windows, so masked pretraining keeps few constant ones).
Printed: the share of constant windows per stage, median times and the dense / sparse ratio, and
the largest output and gradient difference between the paths.

    PYTHONPATH=. python benchmarks/bench_sparse.py --cache-dir CACHE --threads 1
    PYTHONPATH=. python benchmarks/bench_sparse.py --sweep --threads 1   # where it starts to pay
"""
import argparse
import statistics
import time

import numpy as np
import torch

from midi_rae.cache import load_index
from midi_rae.config import load_config
from midi_rae.dataset import PianoRollDataset
from midi_rae.layers import SwinBlock
from midi_rae.models import build_encoder


def crops(cache: str, collection: str, width: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 128, width) training-style crops (anchored on sounding columns) of one collection,
    spread over its pieces."""
    pieces = [p for p in load_index(cache) if p.get("collection") == collection]
    ds = PianoRollDataset(cache, "all", crop_width=width, pair=False, channels=1, seed=seed, pieces=pieces)
    return torch.stack([ds[int(i)]["x"] for i in np.linspace(0, len(ds) - 1, n)])


def set_sparse(model: torch.nn.Module, flag: bool | None) -> None:
    for m in model.modules():
        if isinstance(m, SwinBlock):
            m.sparse = flag


def const_share(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per stage, the share of its first block's windows whose tokens are all equal."""
    shares: list[float] = []
    hooks = [stage.blocks[0].register_forward_pre_hook(
        lambda blk, args: shares.append(float((lambda w: (w == w[:, :1]).all(2).all(1).float().mean())(blk._windows(args[0])))))
        for stage in model.stages]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shares


def timed(fn, rounds: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def sweep(rounds: int) -> None:
    """Where the constant-window path starts to pay: one block of the reference's finest stage
    (32 x 32 tokens of width 16, windows of 8 x 8) on 32 grids with a given share of constant
    windows (the rest random), dense against sparse, inference and training."""
    torch.manual_seed(0)
    blk = SwinBlock(16, (32, 32), 1, (8, 8))
    print("| share of constant windows | inference dense / sparse | train fwd+bwd dense / sparse |")
    print("|---:|---:|---:|")
    for share in (0.0, 0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75):
        x = torch.randn(32, 32, 32, 16)
        win = x.view(32, 4, 8, 4, 8, 16)  # (B, wy, 8, wx, 8, C)
        const = torch.rand(32, 4, 1, 4, 1, 1) < share
        x = torch.where(const, torch.full_like(win, 0.5), win).view(32, 32, 32, 16)
        ratios = []
        for train in (False, True):
            blk.train(train)
            times = {}
            for flag in (False, True):
                blk.sparse, blk.sparse_min_share = flag, 0.0

                def f() -> None:
                    if train:
                        xi = x.clone().requires_grad_()
                        blk(xi).square().mean().backward()
                    else:
                        with torch.no_grad():
                            blk(x)
                times[flag] = timed(f, rounds)
            ratios.append(times[False] / times[True])
        print(f"| {float(const.float().mean()):.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", help="a prepared cache of the bundled corpus (its collections are read)")
    p.add_argument("--presets", nargs="+", default=["quickstart", "reference"])
    p.add_argument("--collections", nargs="+", default=["essenFolksong", "bach"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="only the share sweep on one block (no cache needed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        sweep(args.rounds)
        return
    print("| preset | collection | constant windows per stage | inference dense ms | sparse ms | auto ms | "
          "dense / sparse | dense / auto | train fwd+bwd dense ms | sparse ms | dense / sparse | max output diff | max grad rel. diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        cfg = load_config(preset, ["model.drop_path_rate=0"])
        torch.manual_seed(0)
        enc = build_encoder(cfg)
        for coll in args.collections:
            x = crops(args.cache_dir, coll, cfg.data.crop_width, args.batch)
            shares = const_share(enc, x)

            def infer(flag):
                def f():
                    set_sparse(enc, flag)
                    with torch.no_grad():
                        return enc.eval()(x)
                return f

            def train(flag):
                def f():
                    set_sparse(enc, flag)
                    enc.train().zero_grad()
                    out = enc(x)
                    sum((lvl.emb.float() ** 2).mean() for lvl in out.patches).backward()
                    return out
                return f

            # equivalence first
            outs = [[lvl.emb.detach().clone() for lvl in train(flag)().patches] for flag in (False, True)]
            grads = []
            for flag in (False, True):
                train(flag)()
                grads.append({n: q.grad.clone() for n, q in enc.named_parameters() if q.grad is not None})
            out_diff = max(float((a - b).abs().max()) for a, b in zip(*outs))
            grad_diff = max(float((grads[0][n] - grads[1][n]).abs().max() / (grads[0][n].abs().max() + 1e-12))
                            for n in grads[0])
            # alternate the paths round by round, so that both see the same machine load
            inf = {False: [], True: [], None: []}
            trn = {False: [], True: []}
            for _ in range(args.rounds):
                for flag in (False, True, None):
                    inf[flag].append(timed(infer(flag), 1))
                for flag in (False, True):
                    trn[flag].append(timed(train(flag), 1))
            med = {k: statistics.median(v) * 1e3 for k, v in inf.items()}
            tmed = {k: statistics.median(v) * 1e3 for k, v in trn.items()}
            print(f"| {preset} | {coll} | {' / '.join(f'{s:.2f}' for s in shares)} | {med[False]:.1f} | {med[True]:.1f} | "
                  f"{med[None]:.1f} | **{med[False] / med[True]:.2f}** | {med[False] / med[None]:.2f} | {tmed[False]:.1f} | "
                  f"{tmed[True]:.1f} | **{tmed[False] / tmed[True]:.2f}** | {out_diff:.1e} | {grad_diff:.1e} |", flush=True)
    set_sparse(enc, None)


if __name__ == "__main__":
    main()
