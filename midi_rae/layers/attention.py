"""Window multi-head self-attention, Swin V2 (cosine + continuous position bias) and V1
(relative position bias table). Parameter names follow timm's per version, so its weights
load as they are.

Everything that is not q.k is folded into q (the V2 logit scale) or into one additive mask
(position bias + shift mask). On GPUs attention runs through `F.scaled_dot_product_attention`;
on the CPU it runs the explicit matmul + softmax, which is also the reference path: with 64-token
windows and head dims of 8-16, torch's CPU SDPA kernels were slower (benchmarks/RESULTS.md), and
in training, where the position bias needs a gradient, SDPA falls back to its own math path
plus a safe-softmax pass. `WindowAttention.fused` = True / False forces one path.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relative_position_index(window_size: tuple[int, int]) -> Tensor:
    """(N, N) long: index into the (2wh-1)*(2ww-1) table of relative offsets, N = wh * ww."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def log_spaced_relative_coords(window_size: tuple[int, int],
                               pretrained_window_size: tuple[int, int] | None = None) -> Tensor:
    """(2wh-1, 2ww-1, 2) relative offsets scaled to [-8, 8] and log-spaced, the CPB MLP's input
    (Swin V2, https://arxiv.org/abs/2111.09883, eq. 4). An axis of length 1 has the single
    offset 0; dividing by max(w - 1, 1) keeps it 0 rather than 0/0 = NaN (as timm 1.0.31 does).

    With `pretrained_window_size` (the window the MLP was trained at) the offsets are scaled by
    that window instead, so an offset the MLP saw keeps its input and larger ones extend past 8,
    where the log spacing keeps the extrapolation short (the paper's window transfer; timm's
    `pretrained_window_size`)."""
    scale = window_size if pretrained_window_size is None else pretrained_window_size
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) / max(p - 1, 1) for w, p in zip(window_size, scale)]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def resize_relative_position_bias_table(table: Tensor, window_size: tuple[int, int],
                                        new_window_size: tuple[int, int]) -> Tensor:
    """A V1 bias table ((2wh-1)*(2ww-1), nH) learned for `window_size`, resampled bicubically to
    the offsets of `new_window_size` (as Swin V1 fine-tuning at a larger window, and timm's
    `resize_rel_pos_bias_table`, do): the table is a (2wh-1) x (2ww-1) image per head."""
    (wh, ww), (nh, nw) = window_size, new_window_size
    if table.shape[0] != (2 * wh - 1) * (2 * ww - 1):
        raise ValueError(f"a bias table of {table.shape[0]} offsets was not learned for a {wh} x {ww} window "
                         f"({(2 * wh - 1) * (2 * ww - 1)} offsets); give the window it was trained at")
    if (wh, ww) == (nh, nw):
        return table
    nH = table.shape[1]
    image = table.T.reshape(1, nH, 2 * wh - 1, 2 * ww - 1).float()
    image = F.interpolate(image, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    return image.reshape(nH, -1).T.contiguous().to(table.dtype)  # ((2nh-1)*(2nw-1), nH)


def _inv_norm(x: Tensor) -> Tensor:
    """(..., 1) 1 / L2 norm over the last axis, the norm taken at least 1e-12 (as F.normalize clamps
    it). As the sum of squares' rsqrt: on q and k, strided views of the qkv output, the backward of
    `linalg.vector_norm` took about twice as long on the CPU (benchmarks/RESULTS.md)."""
    return (x * x).sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, fused: bool, dropout_p: float) -> Tensor:
    """softmax(q k^T + mask) v for windows of all samples.

    q, k, v: (B*nW, nH, N, hd), already scaled. mask: None, (nH, N, N) shared by all windows,
    or (nW, nH, N, N) per window. Returns (B*nW, nH, N, hd).
    """
    BnW, nH, N, hd = q.shape
    nW = mask.shape[0] if mask is not None and mask.dim() == 4 else 1
    if mask is not None:
        mask = mask.to(q.dtype)
    if fused:
        # Fold windows into the head axis, (B, nW*nH, N, hd), so that a per-window mask
        # broadcasts over the batch as (nW*nH, N, N) and SDPA still sees 4-D inputs.
        q, k, v = (t.reshape(BnW // nW, nW * nH, N, hd) for t in (q, k, v))
        mask = None if mask is None else mask.reshape(-1, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
        return out.reshape(BnW, nH, N, hd)
    # Windows split from the batch, (B, nW, nH, ...), so that a per-window mask broadcasts. The mask
    # is added in place to the matmul's own output (its backward does not read it; an in-place add
    # through a view would instead make autograd copy the whole gradient), saving a fresh buffer.
    q, k, v = (t.reshape(-1, nW, nH, N, hd) for t in (q, k, v))
    attn = q @ k.transpose(-2, -1)  # (B, nW, nH, N, N)
    if mask is not None:
        attn.add_(mask)
    attn = F.dropout(attn.softmax(dim=-1), p=dropout_p)
    return (attn @ v).view(BnW, nH, N, hd)


class WindowAttention(nn.Module):
    """Window multi-head self-attention over (B*nW, N, C) windows.

    version=2 (Swin V2, https://arxiv.org/abs/2111.09883): cosine similarity times a learned
    per-head temperature clamped at 100, plus 16 * sigmoid(CPB MLP(log-spaced relative coords)).
    version=1 (Swin V1, https://arxiv.org/abs/2103.14030): scaled dot product plus a learned
    relative position bias table. `pretrained_window_size` (V2 only): the window the CPB MLP was
    trained at, when it runs at another (`log_spaced_relative_coords`).
    """

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, version: int = 2,
                 pretrained_window_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; choose num_heads dividing dim")
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version}")
        if pretrained_window_size is not None and version != 2:
            raise ValueError("pretrained_window_size applies to Swin V2's position-bias MLP; a V1 bias table is "
                             "resized instead (resize_relative_position_bias_table): leave it None")
        self.pretrained_window_size = None if pretrained_window_size is None else tuple(pretrained_window_size)
        self.dim, self.window_size, self.num_heads, self.version = dim, tuple(window_size), num_heads, version
        wh, ww = self.window_size
        if version == 2:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            # V2 has no key bias (it cancels in softmax); a zero buffer keeps one fused qkv matmul.
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.register_buffer("k_bias", torch.zeros(dim) if qkv_bias else None, persistent=False)
            coords = log_spaced_relative_coords(self.window_size, self.pretrained_window_size)
            self.register_buffer("relative_coords_table", coords, persistent=False)
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused: bool | None = None  # None: SDPA on accelerators, explicit on CPU; True / False forces
        # (device, dtype) -> mask: a bias rounded under bf16 autocast must not serve an fp32 pass
        self._mask_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # Weights loaded in place would leave a cached bias stale.
        self.register_load_state_dict_post_hook(lambda module, _: module.clear_cache())

    def no_weight_decay(self) -> set[str]:
        """Position-bias and temperature parameters: decay would pull them toward no bias and a
        flat temperature (timm excludes the V2 CPB MLP and logit scale, and the V1 table)."""
        if self.version == 2:
            return {"logit_scale", *(f"cpb_mlp.{n}" for n, _ in self.cpb_mlp.named_parameters())}
        return {"relative_position_bias_table"}

    def clear_cache(self) -> None:
        self._mask_cache = {}

    def train(self, mode: bool = True):
        self.clear_cache()  # the position bias is learned: never reuse one across training
        return super().train(mode)

    def position_bias(self) -> Tensor:
        """(nH, N, N) additive bias from relative positions, N = wh * ww."""
        N = self.window_size[0] * self.window_size[1]
        if self.version == 2:
            # On the coordinates as one (R, 2) matrix: a (2wh-1, 2ww-1, 2) input made the MLP's backward
            # copy its hidden activations back and forth, a third of its cost on the CPU.
            table = self.cpb_mlp(self.relative_coords_table.view(-1, 2))  # ((2wh-1)(2ww-1), nH)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(N, N, self.num_heads).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.version == 2 else bias

    def additive_mask(self, shift_mask: Tensor | None, device: torch.device) -> Tensor:
        """Position bias plus shift mask: (nH, N, N), or (nW, nH, N, N) with a shift mask.
        Built every call in training (the bias is learned), once in eval mode."""
        # Under torch.compile the bias is computed inside the compiled graph (small and fused);
        # a cache there would only add a guard on module state and a recompile.
        use_cache = not self.training and not torch.compiler.is_compiling()
        # The dtype the bias is computed in: autocast's when it is on, else the parameters'.
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.proj.weight.dtype)
        key = (device, dtype)
        if use_cache and key in self._mask_cache:
            return self._mask_cache[key]
        mask = self.position_bias()
        if shift_mask is not None:
            mask = shift_mask[:, None] + mask[None]  # (nW, nH, N, N)
        if use_cache:
            self._mask_cache[key] = mask.detach()
        return mask

    def constant(self, x: Tensor) -> Tensor:
        """(K, C) tokens, each filling a whole window -> (K, C): the output at every token of such
        a window. Each query's softmax weights sum to one over keys that all carry one value, so
        the output is that value, projected, whatever the logits, position bias or shift mask."""
        C = x.shape[-1]
        bias = self.v_bias if self.version == 2 else None if self.qkv.bias is None else self.qkv.bias[2 * C:]
        return self.proj_drop(self.proj(F.linear(x, self.qkv.weight[2 * C:], bias)))

    def forward(self, x: Tensor, shift_mask: Tensor | None = None, window_ids: Tensor | None = None) -> Tensor:
        """x: (B*nW, N, C); shift_mask: (nW, N, N) additive or None -> (B*nW, N, C). `window_ids`
        (M,): x holds M windows picked from a batch, these their positions in 0..nW-1."""
        B_, N, C = x.shape
        if self.version == 2:
            bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            bias = self.qkv.bias
        qkv = F.linear(x, self.qkv.weight, bias).view(B_, N, 3, self.num_heads, C // self.num_heads)
        # Split on the axis of three, then move heads: unbind's backward (a stack) then lands
        # directly in the linear's (B_, N, 3C) layout, with no further copy.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B_, nH, N, hd)
        if self.version == 2:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (nH, 1, 1)
            # F.normalize divides by the norm; one multiply by (scale / norm), with the logit scale
            # folded into q, costs one pass over q instead of two.
            q = q * (scale * _inv_norm(q))
            k = k * _inv_norm(k)
        else:
            q = q * (q.shape[-1] ** -0.5)
        mask = self.additive_mask(shift_mask, x.device)
        if window_ids is not None and mask.dim() == 4:
            mask = mask[window_ids]  # (M, nH, N, N): one batch of M windows, each with its own mask
        fused = x.device.type != "cpu" if self.fused is None else self.fused
        x = attend(q, k, v, mask, fused, self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))
