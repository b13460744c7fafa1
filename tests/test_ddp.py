"""DDP smoke run: torchrun with 2 CPU processes (gloo) on a tiny config."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from test_train import REPO, lines, tiny


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_processes(tiny_cache: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "midi_rae",
           "train", *tiny(tiny_cache, tmp_path, "name=ddp", "train.max_steps=4", "objective.mep_weight=0.5",
                          "model.drop_path_rate=0.1", "train.device=cpu")]  # gloo, also on a GPU machine
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("[pretrain] encoder weights") == 1  # rank 0 prints
    log = lines(tmp_path / "ddp" / "pretrain" / "metrics.jsonl")
    assert [l["step"] for l in log if l["split"] == "train"] == [1, 2, 3, 4]  # one writer
    final = log[-1]
    # Both ranks ended with identical weights (compared by digest at the end of training).
    assert final["world_size"] == 2 and final["ranks_agree"] is True
    state_rngs = __import__("torch").load(tmp_path / "ddp" / "pretrain" / "checkpoints" / "step_00000004" / "state.pt",
                                          weights_only=True)["rng"]
    assert len(state_rngs) == 2  # each process's RNG is saved, so a resumed DDP run continues exactly


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_a_command_leaves_no_process_group_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gloo group left to the interpreter's exit now and then aborted a finished torchrun process
    (SIGABRT, "terminate called without an active exception"): `main` destroys it, on success and error."""
    from midi_rae import cli

    def command(fail: bool):
        def run(args) -> int:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            if fail:
                raise ValueError("bad input")
            return 0
        return lambda sub: (sub.add_parser("probe"), run)[1]

    for fail in (False, True):
        monkeypatch.setattr(cli, "COMMANDS", {"probe": command(fail)})
        assert cli.main(["probe"]) == (2 if fail else 0)
        assert not dist.is_initialized()


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node=2 on a one-GPU machine: the second process's GPU does not exist."""
    import torch

    from midi_rae.config import ConfigError, load_config
    from midi_rae.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"local rank 1 but the machine has 1 GPU.*--nproc_per_node.*train.device=cpu"):
        setup(load_config("quickstart").train)
