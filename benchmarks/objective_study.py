"""Objective study at a fixed wall-clock budget: every row pretrains the same encoder shape for the
same minutes (not steps: a second view or a teacher costs time), then goes through the probe suite.

    python benchmarks/objective_study.py --preset reference --budget-min 4 --seeds 0 1 --rows simmim infonce \
        --cache-dir CACHE --out study/

1. Timing: each (row, seed) trains `--timing-steps` steps, all at once, each pinned to its own
   `--threads` cores, so every job runs under the load it will train under.
2. Training: each job gets `budget / its step time` steps (the schedule spans them), all at once.
3. Probes: `midi-rae probe RUN --level all` for every job, plus one random-initialisation twin
   of the preset's encoder.
4. With `--levels-subsets K ...`: the rate-distortion rows (`midi-rae levels`) of every job, and
   of the random twin once. Results: `study.json` in `--out`.
Jobs run as many at once as the machine has `--threads`-core slots (the rest wait their turn).
Rows are dotted overrides of the preset (see ROWS); the commands run are written beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Each row switches its objectives explicitly, so it means the same over any preset.
OFF = ["objective.global_weight=0", "objective.descriptor_weight=0", "objective.lejepa_weight=0", "objective.mep_weight=0", "objective.multiscale_weight=0",
       "objective.recon_levels=null", "objective.recon_visible_weight=0", "objective.coarse_ae_weight=0",
       "objective.recon_nested=false", "objective.descriptor_skip_levels=0", "objective.recon_decoder=fpn",
       "objective.isotropy_weight=0", "model.inter_stage_mask_ratio=0", "objective.descriptor_rhythm_weight=1",
       "objective.descriptor_rhythm_skip_levels=0", "data.view_mode=shift"]
SIMMIM = OFF + ["objective.recon_weight=1", "objective.mask_ratio=0.5"]
# nothing masked: a plain autoencoder through the 2 coarsest levels
COARSE_AE_M0 = SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1", "objective.mask_ratio=0"]
# the same with the descriptor head reading every level but the two coarsest
COARSE_AE_M0_FINE = COARSE_AE_M0 + ["objective.descriptor_skip_levels=2"]
# through the mirrored decoder, 8 x 2 patches, light targets on every level; then the same nested
P82_SWINDEC_FLAT = COARSE_AE_M0 + ["objective.descriptor_weight=0.25", "model.patch_h=8", "model.patch_w=2",
                                   "objective.recon_decoder=swin"]
P82_SWINDEC = P82_SWINDEC_FLAT + ["objective.recon_nested=true"]
# the same with SIGReg on the two coarsest levels (the `reference` preset's objective until the nineteenth pass)
ISO005 = P82_SWINDEC + ["objective.isotropy_weight=0.005"]
# the same without nested dropout
ISO005_FLAT = P82_SWINDEC_FLAT + ["objective.isotropy_weight=0.005"]
# the same with the onset channel folded into the frame (`ref_fold6k`)
ISO005_FOLD = ISO005 + ["data.channels=2", "model.fold_onsets=true"]
# the same with the rhythm descriptors asked of the three finer levels only (weight set per row)
ISO005_FOLD_FINE = ISO005_FOLD + ["objective.descriptor_rhythm_skip_levels=2"]
ROWS: dict[str, list[str]] = {
    "simmim": SIMMIM,  # SimMIM alone (the quickstart's objective)
    "simmim_m75": SIMMIM + ["objective.mask_ratio=0.75"],
    "simmim_patch8": SIMMIM + ["model.patch_w=8"],  # 4 x 8 patches (pitch x time)
    "mep": SIMMIM + ["objective.mep_weight=1"],  # + masked embedding prediction against an EMA teacher
    "multiscale": SIMMIM + ["objective.multiscale_weight=1"],
    "inter_stage": SIMMIM + ["model.inter_stage_mask_ratio=0.3"],
    "lejepa_shift": OFF + ["objective.recon_weight=0", "objective.lejepa_weight=1"],  # per-token LeJEPA, aligned views
    "coarse_ae": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1"],  # decoder reads 2 coarsest levels
    "coarse_ae_m0": COARSE_AE_M0,
    "coarse_ae_m25": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                               "objective.mask_ratio=0.25"],  # the mask ratio between coarse_ae and coarse_ae_m0
    "coarse_ae_m75": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                               "objective.mask_ratio=0.75"],
    # the encoder also reads the onset channel, which the descriptor baseline uses (the frame channel
    # alone merges repeated notes of one pitch)
    "coarse_ae_onsets": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1", "data.channels=2"],
    # + a linear head on the pooled levels regressing the crop's hand-crafted descriptors (MaskFeat-style targets)
    "coarse_ae_desc": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                                "objective.descriptor_weight=1"],
    # the same with the onset channel folded into the frame's pixels (0 silent, 0.5 held, 1 onset): the
    # targets' onsets are then the real ones, and the finest level can still hold the whole roll
    "coarse_ae_desc_fold": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                                     "objective.descriptor_weight=1", "data.channels=2", "model.fold_onsets=true"],
    # the unmasked coarse autoencoder with the hand-crafted targets; then with nested dropout of its
    # levels (each sample decoded from its k coarsest, k uniform in 1..2), so level 0 must stand alone
    "coarse_ae_m0_desc": COARSE_AE_M0 + ["objective.descriptor_weight=1"],
    "coarse_ae_m0_desc_nested": COARSE_AE_M0 + ["objective.descriptor_weight=1", "objective.recon_nested=true"],
    # the same with the targets read from the finer levels only: the two coarsest are left to the roll
    "coarse_ae_m0_desc_fine": COARSE_AE_M0_FINE + ["objective.descriptor_weight=1"],
    # the same at a quarter of the target weight; then with nested dropout (the `reference` preset's objective)
    "coarse_ae_m0_desc25_fine": COARSE_AE_M0_FINE + ["objective.descriptor_weight=0.25"],
    "coarse_ae_m0_desc25_fine_nested": COARSE_AE_M0_FINE + ["objective.descriptor_weight=0.25", "objective.recon_nested=true"],
    # the same with 8 x 2 patches (pitch x time; same tokens and floats per level); then decoded by the
    # mirrored SwinDecoder (the decoder `levels` trains) instead of the FPN-style one
    "coarse_ae_m0_desc25_fine_p82_nested": COARSE_AE_M0_FINE + ["objective.descriptor_weight=0.25",
                                                                "objective.recon_nested=true", "model.patch_h=8",
                                                                "model.patch_w=2"],
    "coarse_ae_m0_desc25_fine_p82_swindec_nested": P82_SWINDEC + ["objective.descriptor_skip_levels=2"],
    # the same with the targets read from every level (`ref_n82sda`); then with SIGReg on the two
    # coarsest levels' tokens against their collapse (`ref_n82sdai02`, `ref_n82sdai005`)
    "coarse_ae_m0_desc25_p82_swindec_nested": P82_SWINDEC,
    "coarse_ae_m0_desc25_p82_swindec_iso02_nested": P82_SWINDEC + ["objective.isotropy_weight=0.02"],
    "coarse_ae_m0_desc25_p82_swindec_iso005_nested": ISO005,
    # the same without nested dropout: over the `reference` preset (folded onsets, time stage), its
    # objective from the nineteenth to the twenty-first pass (`ref_nn`); then without the rhythm
    # features among the levels' targets (the time stage keeps its own): its objective since the
    # twenty-second pass (`ref_r0`)
    "coarse_ae_m0_desc25_p82_swindec_iso005": ISO005_FLAT,
    "coarse_ae_m0_desc25_p82_swindec_iso005_r0": ISO005_FLAT + ["objective.descriptor_rhythm_weight=0"],
    # the `reference` objective with a piece-level InfoNCE (weight 0.05) on two passages of each piece,
    # both training crops of the batch (16 pieces x 2 crops: the step's crops and compute unchanged, a
    # step 1.04x); it collapsed the coarse levels and cost collection and the source set (`gib0.05`)
    "coarse_ae_m0_desc25_p82_swindec_iso005_gib05_r0": ISO005_FLAT + [
        "objective.descriptor_rhythm_weight=0", "train.batch_size=16", "data.view_mode=piece",
        "objective.global_weight=0.05", "objective.global_in_batch=true"],
    # the `reference` objective with windows of 4 x 16 tokens (pitch x time), long enough in time
    # at the finest stages to hold two bars (`ref_w416`); with the onset channel folded into the
    # frame, so that repeated notes stay apart (`ref_fold6k`)
    "coarse_ae_m0_desc25_p82_swindec_iso005_w416_nested": ISO005 + ["model.window_size=[4,16]"],
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_nested": ISO005_FOLD,
    # the same with the rhythm descriptors (IOI histogram, onset autocorrelation) weighted 4x in the
    # descriptor loss: alone they read the time signature as well as all the descriptors
    # (`ref_fold_r4`), or 2x (`ref_fold_r2`)
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm4_nested": ISO005_FOLD + ["objective.descriptor_rhythm_weight=4"],
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm2_nested": ISO005_FOLD + ["objective.descriptor_rhythm_weight=2"],
    # the rhythm targets (weight 4, 8) on the three finer levels only, the pitch targets on every level
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm4fine_nested": ISO005_FOLD_FINE + ["objective.descriptor_rhythm_weight=4"],
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm8fine_nested": ISO005_FOLD_FINE + ["objective.descriptor_rhythm_weight=8"],
    # the same with every stage 1.25x wider (embed_dim 20): the levels' means hold 620 floats instead
    # of 496, levels 0..1 3,840 (under a quarter of the crop's 16,384 pixels); a step costs 1.19x
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm4fine_e20_nested": ISO005_FOLD_FINE + [
        "objective.descriptor_rhythm_weight=4", "model.embed_dim=20"],
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_rhythm8fine_e20_nested": ISO005_FOLD_FINE + [
        "objective.descriptor_rhythm_weight=8", "model.embed_dim=20"],
    # the folded-onset row (rhythm weight 1) with a time stage beside the pyramid (`swin.TimeStage`,
    # width 128): every level's profile over time under stop-gradient, trained on the descriptors with
    # the rhythm weighted 4x, so the metre is held outside the levels the reconstruction fills; a step
    # costs 1.13x (`ref_fold_t128`, 5,500 steps)
    "coarse_ae_m0_desc25_p82_swindec_iso005_fold_time128_nested": ISO005_FOLD + ["model.time_stage_dim=128"],
    # half of each batch SimMIM (decoder reads every level), half the unmasked coarse autoencoder
    "simmim_coarse_ae": SIMMIM + ["objective.coarse_ae_weight=1", "objective.coarse_ae_levels=2"],
    "infonce": OFF + ["objective.recon_weight=0", "objective.global_weight=1", "data.view_mode=piece"],
    "lejepa_global": OFF + ["objective.recon_weight=0", "objective.global_weight=1", "objective.global_loss=lejepa",
                            "data.view_mode=piece"],
    "infonce_coarse_ae": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                                   "objective.global_weight=1", "data.view_mode=piece"],
    "lejepa_global_coarse_ae": SIMMIM + ["objective.recon_levels=2", "objective.recon_visible_weight=1",
                                         "objective.global_weight=1", "objective.global_loss=lejepa", "data.view_mode=piece"],
}


def run_jobs(cmds: list[tuple[str, list[str]]], threads: int, logs: Path, timeout: float) -> dict[str, int]:
    """Run every (name, argv), as many at once as the machine has `threads`-core slots, each job
    pinned to its slot's cores; a job past `timeout` seconds is killed (code -9)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    free = list(range(max((os.cpu_count() or 1) // threads, 1)))
    waiting, running, codes = list(cmds), {}, {}
    while waiting or running:
        while waiting and free:
            name, argv = waiting.pop(0)
            slot = free.pop(0)
            cores = ",".join(str(slot * threads + i) for i in range(threads))
            with open(logs / f"{name}.log", "w") as log:
                proc = subprocess.Popen(["taskset", "-c", cores, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[name] = (proc, slot, time.time())
        time.sleep(1)
        for name, (proc, slot, start) in list(running.items()):
            if proc.poll() is None and time.time() - start > timeout:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                codes[name] = proc.returncode
                free.append(slot)
                del running[name]
    return codes


def step_time(metrics: Path) -> float:
    """Seconds per step from the training lines of metrics.jsonl (first line excluded: start-up)."""
    lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    train = [l for l in lines if l.get("split") == "train"]
    a, b = train[1 if len(train) > 2 else 0], train[-1]
    return (b["time"] - a["time"]) / (b["step"] - a["step"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="reference")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget-min", type=float, default=4.0, help="training minutes per job")
    p.add_argument("--threads", type=int, default=1, help="cores per job")
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--device", default="cpu", help="train.device of every job (the budget is then shared GPU time)")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--probe-timeout", type=float, default=900, help="seconds the probes may take")
    p.add_argument("--probe-args", default="--level all", help="extra arguments of `midi-rae probe`")
    p.add_argument("--levels-subsets", type=int, nargs="*", default=[], metavar="K",
                   help="also the rate-distortion rows (`midi-rae levels --subsets K ...`) of every job; none: skip")
    p.add_argument("--levels-steps", type=int, default=1000, help="decoder steps per rate-distortion row")
    args = p.parse_args()
    out = Path(args.out)
    py = [sys.executable, "-m", "midi_rae"]
    # Seed-major: when jobs run in waves, each wave holds one seed of every row, so rows are
    # compared under the same load.
    jobs = [(f"{row}-s{seed}", row, seed) for seed in args.seeds for row in args.rows]

    def train_cmd(name: str, row: str, seed: int, where: str, steps: int, log_every: int) -> list[str]:
        return [*py, "train", "-c", args.preset, f"name={name}", f"out_dir={out / where}", f"data.cache_dir={args.cache_dir}",
                *ROWS[row], f"train.seed={seed}", f"train.max_steps={steps}", f"train.log_every={log_every}",
                f"train.threads={args.threads}", f"train.device={args.device}", "train.eval_every=0", f"train.ckpt_every={max(steps, 1)}",
                "train.progress=false", "train.tensorboard=false", "data.val_max_items=64"]

    t0 = time.time()
    run_jobs([(n, train_cmd(n, r, s, "timing", args.timing_steps, 2)) for n, r, s in jobs], args.threads,
             out / "logs" / "timing", 600)
    steps = {}
    for n, r, s in jobs:
        try:
            steps[n] = max(int(args.budget_min * 60 / step_time(out / "timing" / n / "pretrain" / "metrics.jsonl")), 10)
        except (OSError, IndexError, ValueError):
            steps[n] = 0  # the timing run failed: see logs/timing/<name>.log
    print(f"timing done in {time.time() - t0:.0f} s: {steps}", flush=True)
    cmds = {n: train_cmd(n, r, s, "runs", steps[n], 25) for n, r, s in jobs if steps[n]}
    t1 = time.time()
    codes = run_jobs(list(cmds.items()), args.threads, out / "logs" / "train", args.budget_min * 60 * 1.5 + 120)
    print(f"training done in {time.time() - t1:.0f} s: {codes}", flush=True)
    done = [n for n in cmds if codes.get(n) == 0]
    probe = lambda run, extra: [*py, "probe", str(out / "runs" / run), "--cache-dir", args.cache_dir,  # noqa: E731
                                *args.probe_args.split(), *extra, "-o", str(out / "probes" / f"{run}.json")]
    (out / "probes").mkdir(parents=True, exist_ok=True)
    # The random-initialisation twin once per encoder shape (a row that changes the model or its
    # input has its own), with the first finished job of that shape.
    row_of = {n: r for n, r, _ in jobs}
    shape = lambda n: tuple(o for o in ROWS[row_of[n]] if o.startswith(("model.", "data.channels=", "data.crop_width=")))  # noqa: E731
    twins = set({shape(n): n for n in reversed(done)}.values())
    pcmds = [(n, probe(n, [] if n in twins else ["--no-random"])) for n in done]
    t2 = time.time()
    pcodes = run_jobs(pcmds, args.threads, out / "logs" / "probe", args.probe_timeout)
    print(f"probes done in {time.time() - t2:.0f} s: {pcodes}", flush=True)
    if args.levels_subsets and done:
        levels = lambda run, extra: [*py, "levels", str(out / "runs" / run), "--cache-dir", args.cache_dir,  # noqa: E731
                                     "--subsets", *map(str, args.levels_subsets), "--steps", str(args.levels_steps),
                                     "--threads", str(args.threads), "--device", args.device, *extra]
        lcmds = [(n, levels(n, [] if n in twins else ["--no-random"])) for n in done]
        t3 = time.time()
        lcodes = run_jobs(lcmds, args.threads, out / "logs" / "levels", 6 * 3600)
        print(f"rate-distortion done in {time.time() - t3:.0f} s: {lcodes}", flush=True)
    rows = []
    for n, r, s in jobs:
        pj = out / "probes" / f"{n}.json"
        res = json.loads(pj.read_text()) if pj.exists() else None
        lj = out / "runs" / n / "levels" / "levels.json"
        lv = json.loads(lj.read_text()) if lj.exists() else None
        rows.append({"job": n, "row": r, "seed": s, "steps": steps[n], "overrides": ROWS[r], "command": cmds.get(n),
                     "step_s": args.budget_min * 60 / steps[n] if steps[n] else None,
                     "probe": res and [{"task": t["task"], "rows": t["rows"], "classes": t["classes"],
                                        "test_pieces": t["test_pieces"]} for t in res["tasks"]],
                     "levels": lv and [{k: row[k] for k in ("encoder", "k", "floats_per_crop", "threshold", "val")}
                                       for row in lv["rows"]]})
    (out / "study.json").write_text(json.dumps({"preset": args.preset, "budget_min": args.budget_min, "device": args.device,
                                                "threads": args.threads, "rows": rows}, indent=1))
    print(f"all done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
