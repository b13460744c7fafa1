"""Commands are peers: no command module imports another (at the top or inside a function); what two
commands share lives in a layer below them (`runs`, `stages`, `evaluate`, `cache`, `probes`, `dataset`, ...).
The data layer is the bottom one, and the training loop is handed its model and data."""
import ast
from pathlib import Path

import pytest

import midi_rae

PACKAGE = Path(midi_rae.__file__).parent
COMMANDS = {"train", "encode", "reconstruct", "eval", "probe", "levels", "prepare"}
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
DATA = {"roll", "corpus", "cache", "dataset", "descriptors"}
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
