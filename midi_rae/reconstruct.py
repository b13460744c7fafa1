"""`midi-rae reconstruct`: a piece through the trained encoder and decoder, back to MIDI.

The piece is cut into non-overlapping windows of the model's width (the last one zero-padded),
each window is encoded and decoded on its own, and the probabilities are put side by side and
trimmed to the piece's length. Pixels above the threshold (the run's `decoder.threshold`
unless given) become notes; with an onset channel, predicted onsets split repeated notes.
The MIDI file ends where the input ends (an end marker keeps trailing silence).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import symusic
import torch
from torch import Tensor

from midi_rae.dataset import read_inputs, windows
from midi_rae.models import DecoderTrainer
from midi_rae.roll import MIDI_SUFFIXES, TPQ, roll_to_score
from midi_rae.runs import load_autoencoder, roll_settings
from midi_rae.utils import atomic_write, check_output, resolve_device

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/soundfonts/FluidR3_GM.sf2", "/usr/share/soundfonts/default.sf2",
              "/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/local/share/soundfonts/default.sf2",
              "/opt/homebrew/share/soundfonts/default.sf2")
# 16 rows of 256 steps: about 8 minutes of music at 120 bpm and 4 steps per beat.
PNG_MAX_STEPS = 4096
INSTALL_HINT = ("install fluidsynth and a General MIDI soundfont, e.g. `apt-get install fluidsynth fluid-soundfont-gm` "
                "(macOS: `brew install fluid-synth` and pass --soundfont PATH.sf2)")


@torch.no_grad()
def reconstruct_roll(model: DecoderTrainer, roll: Tensor | np.ndarray, batch_size: int = 16) -> Tensor:
    """Note probabilities of a whole roll: (C, 128, T) in [0, 1] -> (C_model, 128, T)."""
    x = torch.as_tensor(roll).float()
    C, W = model.encoder.in_chans, model.encoder.img_size[1]
    if x.dim() != 3 or x.shape[0] < C:
        raise ValueError(f"expected a ({C}, 128, T) roll, got {tuple(x.shape)}")
    wins, _ = windows(x[:C], W, W)  # (K, C, 128, W)
    device = next(model.parameters()).device
    probs = torch.cat([model.logits(wins[i:i + batch_size].to(device)).sigmoid().float().cpu()
                       for i in range(0, len(wins), batch_size)])  # (K, C, 128, W)
    return probs.permute(1, 2, 0, 3).flatten(2)[..., : x.shape[-1]]  # (C, 128, T)


def write_midi(probs: Tensor, path: str | os.PathLike, threshold: float, steps_per_beat: int = 4,
               like: str | os.PathLike | None = None) -> Path:
    """Binary roll at `threshold` -> MIDI file lasting exactly the roll's T steps. With `like` a
    MIDI file, its tempo and time-signature changes are copied, so the result plays at the
    original's speed (the roll counts quarter notes, not seconds)."""
    roll = (probs > threshold).to(torch.uint8).numpy()  # (C, 128, T)
    score: symusic.Score = roll_to_score(roll, steps_per_beat)
    ticks = TPQ // steps_per_beat if TPQ % steps_per_beat == 0 else 1
    score.markers.append(symusic.TextMeta(roll.shape[-1] * ticks, "end"))  # keeps trailing silence
    if like is not None and Path(like).suffix.lower() in MIDI_SUFFIXES and Path(like).is_file():
        source = symusic.Score(str(like)).to("quarter")
        tpq = steps_per_beat * ticks
        score.tempos.extend(symusic.Tempo(round(t.time * tpq), qpm=t.qpm) for t in source.tempos)
        score.time_signatures.extend(symusic.TimeSignature(round(t.time * tpq), t.numerator, t.denominator)
                                     for t in source.time_signatures)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = score.dumps_midi()  # written by Python: a failed write is an OSError naming the path
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def find_soundfont(given: str | None = None) -> Path | None:
    if given:
        return Path(given) if Path(given).is_file() else None
    env = os.environ.get("SOUNDFONT") or os.environ.get("SF2")
    for p in ([env] if env else []) + list(SOUNDFONTS):
        if Path(p).is_file():
            return Path(p)
    return None


def render_wav(midi: str | os.PathLike, wav: str | os.PathLike, soundfont: str | None = None, rate: int = 44100) -> Path:
    """Render a MIDI file with the fluidsynth binary; RuntimeError with install hints when it or a soundfont is missing."""
    exe = shutil.which("fluidsynth")
    sf2 = find_soundfont(soundfont)
    if exe is None or sf2 is None:
        missing = "fluidsynth is not on PATH" if exe is None else (
            f"soundfont {soundfont} not found" if soundfont else "no General MIDI soundfont found (searched $SOUNDFONT, "
            + ", ".join(SOUNDFONTS[:3]) + ", ...)")
        raise RuntimeError(f"cannot render audio: {missing}; {INSTALL_HINT}")

    def render(tmp: Path) -> None:  # the type named (-T): the temporary name's extension is not .wav
        done = subprocess.run([exe, "-ni", "-T", "wav", "-F", str(tmp), "-r", str(rate), str(sf2), str(midi)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"fluidsynth failed (exit status {done.returncode}): {last[0]}; {wav} was not written")

    return atomic_write(wav, render)  # a failed render leaves a WAV already there as it was


def comparison_png(target: np.ndarray, probs: np.ndarray, path: str | os.PathLike, threshold: float, title: str,
                   chunk: int = 256, max_steps: int = PNG_MAX_STEPS) -> Path:
    """Frame channel of a piece as rows of `chunk` steps: ground truth / reconstruction / errors.
    Only the first `max_steps` steps are drawn (the title says so): the figure of a whole long
    piece took over 10 minutes and 4 GB for 7 hours of music."""
    from midi_rae.plots import recon_figure

    T = target.shape[-1]
    if T > max_steps:
        target, probs = target[:, :max_steps], probs[:, :max_steps]  # (128, max_steps)
        title = f"{title} (first {max_steps} of {T} steps)"
        T = max_steps
    n = max(1, -(-T // chunk))
    pad = n * chunk - T
    t = np.pad(target, ((0, 0), (0, pad))).reshape(128, n, chunk).transpose(1, 0, 2)  # (n, 128, chunk)
    p = np.pad(probs, ((0, 0), (0, pad))).reshape(128, n, chunk).transpose(1, 0, 2)
    labels = [f"steps {i * chunk}-{min((i + 1) * chunk, T)}" for i in range(n)]
    return recon_figure(t, p, path, threshold, title, labels)


def add_reconstruct(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("reconstruct", help="encode -> decode a piece and write it back as MIDI (optional PNG / WAV)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder (runs/<name>) with a trained decoder, or decoder.safetensors")
    p.add_argument("input", metavar="IN", help="a music file (MIDI, MusicXML, ABC, ...)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.mid")
    p.add_argument("--piece", type=int, default=0, help="which piece of a multi-piece file (default 0)")
    p.add_argument("--threshold", type=float, help="note probability threshold (default: the run's decoder.threshold)")
    p.add_argument("--png", metavar="PATH", help="also write a roll comparison figure")
    p.add_argument("--png-steps", type=int, default=PNG_MAX_STEPS, metavar="N",
                   help=f"the figure shows the first N time steps (default {PNG_MAX_STEPS})")
    p.add_argument("--wav", metavar="PATH", help="also render audio with fluidsynth (needs a GM soundfont)")
    p.add_argument("--soundfont", metavar="SF2", help="soundfont for --wav (default: common system paths, $SOUNDFONT)")
    p.add_argument("--device", default="cpu")

    def run(args: argparse.Namespace) -> int:
        if args.png_steps < 1:
            raise ValueError(f"--png-steps must be positive, got {args.png_steps}")
        if args.threshold is not None and not 0 <= args.threshold < 1:  # 0: every pixel a note
            raise ValueError(f"--threshold is a note probability, in [0, 1); got {args.threshold}")
        if Path(args.out).suffix.lower() not in (".mid", ".midi"):  # a name like x.png would get MIDI bytes
            raise ValueError(f"-o {args.out}: the reconstruction is written as MIDI, give a .mid name (the figure "
                             f"goes to --png, audio to --wav)")
        for flag, out, suffix in (("--png", args.png, ".png"), ("--wav", args.wav, ".wav")):
            if out and Path(out).suffix.lower() != suffix:  # found before the model runs, not after the MIDI is written
                raise ValueError(f"{flag} {out}: give a {suffix} name")
        if not Path(args.input).is_file():  # read_inputs would point to --cache-dir, which this command has not
            raise FileNotFoundError(f"{args.input} is not a file: reconstruct reads one music file (MIDI, MusicXML, "
                                    f"ABC, ...)")
        source = Path(args.input).resolve()
        for flag, out in (("-o", args.out), ("--png", args.png), ("--wav", args.wav)):
            if out and Path(out).resolve() == source:
                raise ValueError(f"{flag} {out} is the input file, which would be overwritten; give another name")
        # Outputs are checked before the model runs, which can take minutes on a long piece.
        # (A missing folder for OUT.mid is fine: write_midi makes it.)
        for out in (args.png, args.wav):
            if out:
                check_output(out)
        if Path(args.out).is_dir():
            check_output(args.out)
        model, cfg = load_autoencoder(args.checkpoint, resolve_device(args.device))
        pieces = read_inputs([args.input], settings=roll_settings(cfg))
        if not 0 <= args.piece < len(pieces):
            raise ValueError(f"{args.input} holds {len(pieces)} piece(s); --piece must be in 0..{len(pieces) - 1}")
        pc = pieces[args.piece]
        thr = args.threshold if args.threshold is not None else cfg.decoder.threshold
        probs = reconstruct_roll(model, pc.roll)
        out = write_midi(probs, args.out, thr, pc.meta.get("steps_per_beat", 4), like=args.input)
        print(f"{out}: {probs.shape[-1]} steps, {int((probs[0] > thr).sum())} note pixels "
              f"(input {int((pc.roll[0] > 0).sum())}), threshold {thr:g}")
        if args.png:
            print(comparison_png(pc.roll[0], probs[0].numpy(), args.png, thr, f"{pc.name}: input vs reconstruction",
                                 max_steps=args.png_steps))
        if args.wav:
            try:
                print(render_wav(out, args.wav, args.soundfont))
            except RuntimeError as e:
                print(f"midi-rae reconstruct: {e}", file=sys.stderr)
                return 3
        return 0

    return run
