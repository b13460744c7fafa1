"""Commands are peers: no command module imports another (at the top or inside a function); what two
commands share lives in a layer below them (`runs`, `stages`, `evaluate`, `cache`, `probes`, `dataset`, ...).
The data layer is the bottom one, and the training loop is handed its model and data."""
import ast
from pathlib import Path

import pytest

import midi_rae

PACKAGE = Path(midi_rae.__file__).parent
COMMANDS = {"train", "encode", "reconstruct", "eval", "probe", "levels", "prepare", "finetune"}
# Every module below the commands: all but the commands and the command line (one table of them).
LOWER = sorted(p for p in PACKAGE.rglob("*.py")
               if p.stem not in COMMANDS and p.relative_to(PACKAGE).as_posix() not in ("cli.py", "__main__.py"))


def imported_modules(path: Path) -> set[str]:
    """Every `midi_rae.<module>` that `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else f"midi_rae.{node.module}"
            found.add(module)
            if module == "midi_rae":  # `from midi_rae import train` imports a module
                found |= {f"midi_rae.{a.name}" for a in node.names}
    return {m.split(".")[1] for m in found if m.startswith("midi_rae.")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_never_import_each_other(command: str) -> None:
    others = imported_modules(PACKAGE / f"{command}.py") & (COMMANDS - {command})
    assert not others, f"midi_rae.{command} imports the command module(s) {sorted(others)}; move what they share down a layer"


@pytest.mark.parametrize("path", LOWER, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_below_the_commands_never_import_one(path: Path) -> None:
    """Arrows point down: only the command line knows the commands."""
    commands = imported_modules(path) & COMMANDS
    assert not commands, f"{path.relative_to(PACKAGE)} imports the command module(s) {sorted(commands)}"


def test_every_command_module_exists() -> None:
    assert COMMANDS <= {p.stem for p in PACKAGE.glob("*.py")}


# The data layer (formats <-> roll, the cache, the Dataset) is the bottom one: it knows no config,
# model, training or run module.
DATA = {"roll", "corpus", "cache", "dataset", "descriptors", "labels"}
# The training loop is handed its model and data by the stages: it knows no model by name, no run
# folder and no stage.
LOOP = {"distributed", "logger", "trainer", "engine"}


@pytest.mark.parametrize("module", sorted(DATA))
def test_data_layer_imports_only_the_data_layer(module: str) -> None:
    above = imported_modules(PACKAGE / f"{module}.py") - DATA - {"utils"}
    assert not above, f"midi_rae.{module} (data layer) imports {sorted(above)}; pass what it needs in instead"


@pytest.mark.parametrize("module", sorted(LOOP))
def test_training_loop_knows_no_model_run_or_stage(module: str) -> None:
    found = imported_modules(PACKAGE / f"{module}.py") & {"models", "swin", "vit", "predictor", "runs", "stages"}
    assert not found, f"midi_rae.{module} (training loop) imports {sorted(found)}; let the stage hand it over"


def test_the_engine_names_no_model() -> None:
    """The engine asks models for what it needs (`no_weight_decay()`, `fixed_mask_reconstruction`,
    `logits`): it never tests a class or a parameter name nor reaches into a model's parts, so a
    new encoder or objective needs no engine change."""
    source = (PACKAGE / "engine.py").read_text()
    for name in ("SwinEncoder", "ViTEncoder", "__name__", "isinstance(encoder", "model.encoder", "model.mae_decoder",
                 "model.objective", "model.patch_size"):
        assert name not in source, f"engine.py mentions {name!r}"


def test_each_encoder_draws_its_own_mask() -> None:
    import torch

    from midi_rae.swin import SwinEncoder
    from midi_rae.vit import ViTEncoder

    non_empty = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    swin = SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4)
    vit = ViTEncoder(img_height=32, img_width=32, patch_h=4, patch_w=4, embed_dim=16, depth=1, num_heads=2)
    per_sample = swin.draw_mask(non_empty, 0.5, torch.Generator().manual_seed(1))
    equal_counts = vit.draw_mask(non_empty, 0.5, torch.Generator().manual_seed(1))
    assert per_sample.shape == equal_counts.shape == (3, 64)
    assert (~per_sample & non_empty).sum(1).tolist() == [round(0.5 * int(n)) for n in non_empty.sum(1)]  # SimMIM: per sample
    assert len(set((~equal_counts).sum(1).tolist())) == 1  # MAE: the same count in every sample
    assert torch.equal(per_sample, swin.draw_mask(non_empty, 0.5, torch.Generator().manual_seed(1)))  # the generator fixes it


def test_roll_constants_have_one_home() -> None:
    """The pitch count and the velocity scale of a stored roll are defined in `roll` alone."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        if path.name != "roll.py":
            assert "127.0 if" not in source, f"{path.name} computes the velocity scale: use RollSettings.scale"
            assert "PITCHES = " not in source, f"{path.name} defines PITCHES: import it from midi_rae.roll"
