"""Tiny trained runs (encoder + decoder, a few steps) shared by the encode / eval / probe tests:
trained once per test session and per encoder type."""
import json
import os
import random
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from midi_rae.config import load_config
from midi_rae.stages import pretrain, train_decoder

REPO = Path(__file__).resolve().parent.parent

ENCODERS = {
    "swin": ["model.embed_dim=8", "model.depths=[1,1]", "model.num_heads=[1,2]", "model.window_size=4"],
    "vit": ["model.encoder=vit", "model.patch_h=8", "model.patch_w=8", "model.embed_dim=16", "model.num_heads=2",
            "model.depth=1"],
}
_RUNS: dict[str, Path] = {}


@contextmanager
def isolated() -> Iterator[None]:
    """One CPU thread (tiny models run fastest so), and every global RNG and the thread count as
    they were afterwards: training reseeds the RNGs, and later tests must not depend on that."""
    n, np_state, py_state = torch.get_num_threads(), np.random.get_state(), random.getstate()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(n)
        np.random.set_state(np_state)
        random.setstate(py_state)


def trained_run(kind: str, cache: Path, factory: pytest.TempPathFactory) -> Path:
    """runs/<kind>/ with pretrain/encoder.safetensors and decoder/decoder.safetensors, 32-step windows."""
    if kind not in _RUNS:
        out = factory.mktemp("runs")
        cfg = load_config(None, [
            f"name={kind}", f"data.cache_dir={cache}", f"out_dir={out}", "data.crop_width=32", "data.val_fraction=0.2",
            "data.val_max_items=8", "model.mae_decoder_dim=16", "model.mae_decoder_heads=2", *ENCODERS[kind],
            "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.progress=false",
            "train.tensorboard=false", "train.threads=1", "decoder_train.batch_size=4", "decoder_train.max_steps=2",
            "decoder_train.warmup_steps=1", "decoder_train.progress=false", "decoder_train.tensorboard=false",
            "decoder_train.threads=1"])
        with isolated():  # train.threads=1 sets the thread count; seed_all reseeds every RNG
            pretrain(cfg)
            train_decoder(cfg)
        _RUNS[kind] = out / kind
    return _RUNS[kind]


def kill_after_first_checkpoint(cmd: list[str], latest: Path) -> int:
    """Start the command (one thread, this checkout on the path), SIGKILL it as soon as it has
    written `latest` (its checkpoints' latest.json), and return the step that checkpoint holds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return json.loads(latest.read_text())["step"]
