"""Reusable Swin building blocks (NHWC inside stages)."""
from .attention import (WindowAttention, attend, log_spaced_relative_coords, relative_position_index,
                        resize_relative_position_bias_table)
from .block import SwinBlock
from .mlp import DropPath, Mlp
from .patch import PatchEmbed, PatchExpand, PatchMerging, Unpatchify
from .stage import SwinStage
from .transformer import Attention, Block, apply_rope
from .window import clamp_window, padded_size, window_attention_mask, window_partition, window_reverse

__all__ = [
    "WindowAttention", "attend", "log_spaced_relative_coords", "relative_position_index",
    "resize_relative_position_bias_table", "SwinBlock",
    "DropPath", "Mlp", "PatchEmbed", "PatchExpand", "PatchMerging", "Unpatchify", "SwinStage", "clamp_window", "padded_size",
    "window_attention_mask", "window_partition", "window_reverse", "Attention", "Block", "apply_rope",
]
