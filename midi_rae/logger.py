"""A stage's log: `metrics.jsonl` (one JSON line per log), TensorBoard when installed, wandb when
asked; and reading the last line of a split back."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from midi_rae.config import Config, ConfigError
from midi_rae.utils import atomic_write_text


def log_lines_upto(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl up to `step`. A last line that does not parse is what a kill
    in mid-write leaves, and is dropped; any other line that does not parse is kept as it is."""
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                keep.append(line)
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    return keep


def last_record(path: Path, split: str) -> dict[str, Any]:
    """The last line of `split` ('train', 'val', 'final') in a metrics.jsonl; {} when there is none."""
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    return next((l for l in reversed(lines) if l["split"] == split), {})


class Logger:
    """metrics.jsonl, TensorBoard, wandb for one stage; `enabled` on rank 0 only. `section` is the
    config section that holds the stage's training settings (`train`, `decoder_train`)."""

    def __init__(self, stage_dir: Path, cfg: Config, stage: str, section: str, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path = enabled, stage_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint
            atomic_write_text(self.path, "".join(l + "\n" for l in log_lines_upto(self.path, resume_step)))
        tcfg = getattr(cfg, section)
        if tcfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(stage_dir / "tb"))
            except ImportError:  # tensorboard is optional
                pass
        if tcfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"{section}.wandb is true but wandb is not installed: pip install wandb, "
                                  f"or set {section}.wandb=false") from None
            self.wandb = wandb.init(project=tcfg.wandb_project, name=f"{cfg.name}-{stage}", dir=str(stage_dir),
                                    mode=tcfg.wandb_mode, config=cfg.to_dict(), resume="allow")

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        line = {"split": split, "step": step, "time": round(time.time(), 3)}
        if clash := set(line) & set(values):  # a loss part named like one would silently replace it
            raise ValueError(f"logged values {sorted(clash)} share a name with the line's own fields {list(line)}")
        line |= values
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")  # undefined metrics (0 / 0) are written as null
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
