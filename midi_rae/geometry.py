"""The one rule of a Swin pyramid's geometry, shared by the encoders (which name their arguments)
and the config (which names its fields): every stage after the first halves its grid, so each
side must hold a whole number of patches times 2**(stages - 1)."""
from __future__ import annotations


def pyramid_error(size: int, patch: int, stages: int, what: str, patch_name: str, fix: str) -> str | None:
    """None when `size` pixels split into whole `patch`-pixel patches that `stages` stages can
    halve (stages - 1) times; else the message: `what` names the size, `patch_name` the patch
    size, `fix` says what to change (the nearest size that works is appended)."""
    multiple = patch * 2 ** (stages - 1)
    if size % multiple == 0:
        return None
    nearest = max(multiple, round(size / multiple) * multiple)
    return (f"{what} must be divisible by {patch_name} * 2**(stages-1) = {patch} * {2 ** (stages - 1)} = {multiple} "
            f"for {stages} Swin stages, so that every stage halves a whole grid; {fix} (the nearest size that works is "
            f"{nearest})")
