"""What a run is on disk, for every command that reads one.

A run folder `<out_dir>/<name>/` holds `pretrain/` (`encoder.safetensors`) and `decoder/`
(`decoder.safetensors`, and `encoder.safetensors` when the encoder was fine-tuned); each
weights file carries the resolved config in its metadata, so a run is loaded from its files
alone. Commands (`train`, `encode`, `reconstruct`, `eval`, `probe`, `levels`) share these
helpers instead of importing each other.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from torch import nn
from torch.utils.data import Subset

from midi_rae.cache import cache_identity, default_cache_dir, load_settings
from midi_rae.checkpoint import decoder_encoder, load_weights, read_metadata
from midi_rae.config import Config, from_dict
from midi_rae.dataset import PianoRollDataset
from midi_rae.models import DecoderTrainer, build_decoder, build_encoder
from midi_rae.roll import PITCHES, RollSettings
from midi_rae.swin import resize_position_tables, stage_windows

# ----------------------------------------------------------------------------- folders and data


def stage_dirs(cfg: Config) -> tuple[Path, Path, Path]:
    """(run folder, its `pretrain/`, its `decoder/`) of the run `cfg` names."""
    run = Path(cfg.out_dir) / cfg.name
    return run, run / "pretrain", run / "decoder"


def roll_settings(cfg: Config) -> RollSettings:
    """How the run turns music files into rolls: what `midi-rae run` prepares with, and what
    `encode` / `reconstruct` read a file with (its time grid is the one the encoder learned)."""
    return RollSettings(cfg.data.steps_per_beat, expand_repeats=cfg.data.expand_repeats)


def resolve_cache_dir(cfg: Config) -> Path:
    """`data.cache_dir`, else the cache `midi-rae prepare` makes of `data.paths` (or of the
    bundled corpus, restricted to `data.collections`) at the run's time grid."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return default_cache_dir(cfg.data.paths or None, cfg.data.collections or None, roll_settings(cfg))


def check_time_grid(cfg: Config, cache: Path, encoder_path: Path | None = None, overrides: bool = True) -> None:
    """A run reads only a cache on its own time grid: crops of another would silently stretch or
    squeeze time, and its encoder would read music files at a grid it never saw. With the
    encoder's weights: its own cache must still hold what it trained on (`prepare` of other inputs
    into that folder replaces it, and its validation pieces could then be training pieces).
    `overrides`: the command takes KEY=VALUE overrides, so the fix may be the run's grid; the
    commands that read a trained encoder as it is (eval, probe, levels, train-decoder) need a cache on its grid."""
    spb, run_spb = load_settings(cache).steps_per_beat, cfg.data.steps_per_beat
    if spb != run_spb:
        fix = (f"set data.steps_per_beat={spb}, or prepare a cache with --steps-per-beat {run_spb}" if overrides else
               f"use a cache prepared with --steps-per-beat {run_spb} (`midi-rae prepare PATH... "
               f"--steps-per-beat {run_spb} --cache-dir DIR`)")
        raise ValueError(f"the cache {cache} was prepared at {spb} steps per beat, the run says data.steps_per_beat="
                         f"{run_spb}; {fix}")
    trained_on = read_metadata(encoder_path).get("cache") if encoder_path is not None else None
    if (trained_on and Path(cache).expanduser().resolve() == resolve_cache_dir(cfg).resolve()
            and cache_identity(cache) != trained_on):
        raise ValueError(f"the cache {cache} was prepared again since {cfg.name} trained on it (other pieces or another "
                         f"split), so its validation pieces may be ones the encoder trained on; prepare the run's own "
                         f"inputs into it again, or give another cache (--cache-dir) and read the figures as transfer")


def tests_on_training_pieces(run: Config, cache: str | os.PathLike, test_fraction: float) -> bool:
    """Whether a test side of the works hashed under `test_fraction` on `cache` holds pieces `run`
    trained on: on its own cache, any fraction above its `data.val_fraction` reaches into them."""
    return (test_fraction > run.data.val_fraction
            and Path(cache).expanduser().resolve() == resolve_cache_dir(run).resolve())


def spread(n: int, total: int) -> list[int]:
    """`n` item indices spread evenly over `total`, first and last included. Items come in piece-id
    order, so the first n would be the first few pieces: on the whole bundled corpus the first 256
    validation crops hold three of its collections and none of the folk songs."""
    return sorted(set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()))


def datasets(cfg: Config, seed: int, pair: bool, encoder_path: Path | None = None) -> tuple[PianoRollDataset, Subset]:
    """The training crops of the run `cfg` describes, and its validation crops (a fixed set of
    `data.val_max_items`, spread over the validation pieces); `pair`: two views per item, for the
    objectives that compare views; `encoder_path`: a trained encoder whose cache must be unchanged
    (`check_time_grid`) and whose time grid `cfg` carries (`with_encoder_config`: no override changes it)."""
    cache = resolve_cache_dir(cfg)
    if not (cache / "pieces.jsonl").exists():
        raise FileNotFoundError(f"no prepared cache at {cache}: run `midi-rae prepare --cache-dir {cache}` "
                                f"(or `midi-rae run`, which prepares first), or set data.cache_dir")
    check_time_grid(cfg, cache, encoder_path, overrides=encoder_path is None)
    d = cfg.data
    kw = dict(crop_width=d.crop_width, pair=pair, max_time_shift=d.max_time_shift, max_pitch_shift=d.max_pitch_shift,
              val_fraction=d.val_fraction, channels=d.channels, seed=seed, view_mode=d.view_mode,
              crop_starts=d.crop_starts)
    train = PianoRollDataset(cache, "train", transpose=d.transpose, **kw)
    try:
        val = PianoRollDataset(cache, "val", **kw)
    except ValueError:
        raise ValueError(f"the cache {cache} has no validation pieces at data.val_fraction={d.val_fraction}; "
                         f"raise data.val_fraction or prepare more files") from None
    return train, Subset(val, spread(d.val_max_items or len(val), len(val)))


# ----------------------------------------------------------------------------- configs


def encoder_config(path: Path) -> Config:
    """The config an exported encoder (or checkpoint) was trained with, from its metadata."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} carries no config in its metadata; use an encoder.safetensors written by `midi-rae train`")
    return from_dict(Config, yaml.safe_load(meta["config"]))


def with_encoder_config(cfg: Config, enc_cfg: Config) -> Config:
    """`cfg` with the model (and the crop geometry and time grid it needs) of the encoder's own
    config: a decoder must be built for the encoder it reads, and read crops on the grid that
    encoder trained on, whatever the config at hand says."""
    return dataclasses.replace(cfg, model=enc_cfg.model, data=dataclasses.replace(
        cfg.data, crop_width=enc_cfg.data.crop_width, channels=enc_cfg.data.channels,
        steps_per_beat=enc_cfg.data.steps_per_beat))


def trained_windows(cfg: Config) -> list[tuple[int, int]]:
    """The window every stage of `cfg`'s Swin encoder runs, finest first."""
    m = cfg.model
    return stage_windows((PITCHES, cfg.data.crop_width), (m.patch_h, m.patch_w), len(m.depths), m.window_size)


def transfer_config(cfg: Config, window_size: int | list[int] | None = None, crop_width: int | None = None) -> Config:
    """`cfg` with its encoder moved to another window size and / or crop width (None: as trained),
    for weights trained at `cfg` to run there (`load_encoder`). A Swin V2 encoder records the
    windows its weights were trained at, `model.pretrained_window_sizes` (Swin V2's transfer,
    https://arxiv.org/abs/2111.09883): kept from an earlier transfer, since they name the scale the
    position-bias MLP learned on, wherever it was fine-tuned since. A V1 encoder's bias tables are
    resized when loaded. The ViT (2D RoPE, no position table) takes any width of whole patches.
    A size the encoder cannot take is a ValueError saying what to give instead."""
    m, d = cfg.model, cfg.data
    width = d.crop_width if crop_width is None else crop_width
    unit = m.patch_w * 2 ** (len(m.depths) - 1) if m.encoder == "swin" else m.patch_w
    if width <= 0 or width % unit:
        near = sorted({max(width // unit, 1) * unit, (max(width, 0) // unit + 1) * unit})
        how = (f"patch_w {m.patch_w} * 2**{len(m.depths) - 1}, one halving per stage" if m.encoder == "swin"
               else f"patch_w {m.patch_w}")
        raise ValueError(f"crop_width={width} must be a positive multiple of {unit} ({how}) for this encoder; "
                         f"use {' or '.join(map(str, near))}")
    if m.encoder == "vit":
        if window_size is not None:
            raise ValueError("window_size applies to Swin encoders; this run's ViT attends globally: leave it out")
        return dataclasses.replace(cfg, data=dataclasses.replace(d, crop_width=width))
    window = m.window_size if window_size is None else window_size
    grid = (PITCHES // m.patch_h, width // m.patch_w)
    if not all(0 < w <= max(grid) for w in ([window] if isinstance(window, int) else window)):
        raise ValueError(f"window_size={window} does not fit the {grid[0]} x {grid[1]} patch grid of 128 x {width} "
                         f"crops; use 1 to {max(grid)} (a window the size of the grid attends over all of it)")
    pretrained = m.pretrained_window_sizes
    if m.version == 2 and pretrained is None:
        pretrained = [list(w) for w in trained_windows(cfg)]
    model = dataclasses.replace(m, window_size=window, pretrained_window_sizes=pretrained)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(d, crop_width=width))


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Weights:
    path: Path
    prefix: str = ""  # 'encoder.' / 'decoder.' inside a training checkpoint's model.safetensors


@dataclass(frozen=True)
class Checkpoint:
    """What a CHECKPOINT argument names: the encoder (and decoder, if trained) and their config."""

    config: Config
    encoder: Weights
    decoder: Weights | None
    run_dir: Path | None  # the run folder, when one was given


def _has_prefix(path: Path, prefix: str) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(prefix) for k in f.keys())


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A run folder (`runs/<name>`), a stage folder (`pretrain/`, `decoder/`), a training
    checkpoint folder (`step_*/`) or a weights file (`encoder.safetensors`,
    `decoder.safetensors`, `model.safetensors`). The fine-tuned encoder of a decoder stage wins
    over the pretrained one, and a decoder always gets the encoder it was trained on
    (`checkpoint.decoder_encoder`), wherever that lies."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found: give a run folder (runs/<name>) or a .safetensors file")
    run_dir = None
    if p.is_dir():
        if (p / "pretrain").is_dir() or (p / "decoder").is_dir():
            run_dir = p
            candidates = [p / "decoder", p / "pretrain"]
        else:
            candidates = [p]
        dec = next((d / "decoder.safetensors" for d in candidates if (d / "decoder.safetensors").exists()), None)
        enc = decoder_encoder(dec) if dec is not None else next(
            (d / "encoder.safetensors" for d in candidates if (d / "encoder.safetensors").exists()), None)
        if enc is None and (p / "model.safetensors").exists():
            return resolve_checkpoint(p / "model.safetensors")
        if enc is None:
            raise FileNotFoundError(f"no encoder.safetensors under {p}: train first (`midi-rae train` / `midi-rae run`)")
        cfg = encoder_config(dec if dec is not None else enc)
        return Checkpoint(cfg, Weights(enc), Weights(dec) if dec is not None else None, run_dir)
    meta = read_metadata(p)
    cfg = encoder_config(p)
    if meta.get("kind") == "encoder":
        return Checkpoint(cfg, Weights(p), None, None)
    if meta.get("kind") == "decoder":
        return Checkpoint(cfg, Weights(decoder_encoder(p)), Weights(p), None)
    # A training checkpoint: the whole Pretrainer or DecoderTrainer under one file.
    dec = Weights(p, "decoder.") if _has_prefix(p, "decoder.") else None
    return Checkpoint(cfg, Weights(p, "encoder."), dec, None)


# ----------------------------------------------------------------------------- loaders


def load_encoder(checkpoint: str | os.PathLike | Checkpoint, device: torch.device | str = "cpu",
                 window_size: int | None = None, crop_width: int | None = None) -> tuple[nn.Module, Config]:
    """The trained encoder (eval mode) and its config. `window_size` / `crop_width` build it at
    another geometry (`transfer_config`, whose config is returned) and load the same weights
    there, strictly: a V2 position-bias MLP as it is, V1 bias tables resized bicubically; the
    geometry's buffers (relative indices, coordinate tables, attention masks) are built anew."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)
    moved = window_size is not None or crop_width is not None
    cfg = transfer_config(ck.config, window_size, crop_width) if moved else ck.config
    return trained_encoder(ck, cfg).to(device).eval(), cfg


def trained_encoder(ck: Checkpoint, cfg: Config) -> nn.Module:
    """The encoder of `cfg` (`ck.config`, or a `transfer_config` of it, or it with other settings
    that hold no weights, such as `model.drop_path_rate`) holding `ck`'s weights, loaded strictly;
    V1 bias tables are resized where the windows differ from those they were trained at."""
    encoder = build_encoder(cfg)
    adapt = None
    if cfg.model.encoder == "swin" and cfg.model.version == 1 and trained_windows(cfg) != trained_windows(ck.config):
        windows = trained_windows(ck.config)
        adapt = lambda state: resize_position_tables(state, encoder, windows)  # noqa: E731
    load_weights(encoder, ck.encoder.path, ck.encoder.prefix, adapt)
    return encoder


def load_autoencoder(checkpoint: str | os.PathLike | Checkpoint, device: torch.device | str = "cpu") -> tuple[DecoderTrainer, Config]:
    """The trained encoder + decoder (eval mode) and their config: the decoder with the encoder it
    was trained on (fine-tuned, if it was)."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)
    if ck.decoder is None:
        where = ck.run_dir or ck.encoder.path
        raise FileNotFoundError(f"{where} has no decoder: run `midi-rae train-decoder` on it (or `midi-rae run`), "
                                f"then pass the run folder")
    encoder, decoder = build_encoder(ck.config), build_decoder(ck.config)
    load_weights(encoder, ck.encoder.path, ck.encoder.prefix)
    load_weights(decoder, ck.decoder.path, ck.decoder.prefix)
    return DecoderTrainer(encoder, decoder).to(device).eval(), ck.config


def pretraining_config(ck: Checkpoint) -> Config:
    """The config the checkpoint's encoder was pretrained with: its own file's. A run folder's
    config is its decoder's when it has one, and a decoder trained apart (`train-decoder`) records
    the config it was given, whose `train.seed` may not be the pretraining's. Inside a training
    checkpoint (one file) the encoder has no config of its own: the checkpoint's."""
    return ck.config if ck.encoder.prefix else encoder_config(ck.encoder.path)


def initial_encoder(cfg: Config) -> nn.Module:
    """The encoder of `cfg` as pretraining built it before its first step (seeded by
    `train.seed`), in eval mode: the random-initialisation baseline of probes and levels.
    The global RNGs are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_encoder(cfg).eval()
