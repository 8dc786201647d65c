"""The Qwen2-VL and Qwen2.5-VL vision towers in plain torch, with transformers' parameter names.

Both take what the preprocessing gives (``preprocess.py``): the patches of a batch's images concatenated,
(sum of t * h * w, C * T * p * p), and each image's grid (t, h, w), and return the merged tokens, one per
merge_size x merge_size patches, image after image, each image's row-major on its (h / m, w / m) grid: what
the decoder receives in place of the image pad tokens.

- Patch embedding: a Conv3d whose kernel and stride are one whole temporal patch (T x p x p), without bias.
- 2-D RoPE inside each head: the first half of the rotary frequencies turns with the patch's row, the second
  with its column (each half of head_dim / 4 frequencies of theta^(-2i / (head_dim / 2))), in the rotate-half
  layout, computed in float32.
- Pre-norm blocks: norm1, attention (fused qkv with bias, RoPE on q and k, scale head_dim^-0.5, out proj),
  residual; norm2, MLP, residual. A token attends to the tokens of its own frame of its own image only.
- The merger: ln_q, then each block of m x m consecutive tokens concatenated and put through Linear, GELU
  (exact), Linear.

Qwen2-VL: LayerNorm (eps 1e-6) and an fc1 / activation (quick_gelu) / fc2 MLP. Qwen2.5-VL: RMSNorm (eps 1e-6),
a gated MLP (down(act(gate(x)) * up(x)), biases on, silu) and window attention: outside
``fullatt_block_indexes`` a token attends within its window of window_size px (window_size / patch / m merge
blocks a side, the windows row-major, the last ones of a row or column cut short). The tower reorders the
merge blocks window by window before the blocks (and their RoPE with them), so that each window is contiguous,
and puts the merged tokens back in row-major order after the merger.

Weights: transformers' state dict under ``visual.`` (what transformers 5's ``save_pretrained`` writes and the
hub's folders hold) or ``model.visual.`` (a ``*ForConditionalGeneration`` in memory) loads by name with that
prefix removed (``vision_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from flexvlm.architectures.qwen2_vl.preprocess import Grid
from flexvlm.models.decoder import apply_rope
from flexvlm.models.llm import RMSNorm
from flexvlm.weights import StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_model_config

__all__ = ["VISION_PREFIXES", "QwenVisionTower", "VisionSettings", "load_vision_tower", "patch_positions",
           "vision_state", "window_order"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # config.json's model_type
# transformers' hidden_act -> the module computing it the same way
ACTIVATIONS = {"quick_gelu": QuickGELU, "silu": nn.SiLU, "gelu": nn.GELU}
NORM_EPS = 1e-6  # fixed in transformers' vision blocks and merger, not a config key
# where transformers' state dicts hold the tower: in memory (model.visual), as saved and on the hub (visual)
VISION_PREFIXES = ("model.visual.", "visual.")

# transformers' vision config classes (5.x), for the keys a config.json leaves out
_DEFAULTS = {
    "qwen2_vl": {  # Qwen2VLVisionConfig
        "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
        "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "qwen2_5_vl": {  # Qwen2_5_VLVisionConfig
        "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
        "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
_DEFAULT_THETA = 10000.0  # the vision RoPE's rope_parameters.rope_theta


@dataclass(frozen=True)
class VisionSettings:
    """A tower's shape, read from a config.json by ``from_config``."""

    family: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    width: int  # the blocks' (Qwen2-VL's embed_dim, Qwen2.5-VL's hidden_size)
    num_heads: int
    mlp_width: int  # Qwen2-VL's int(embed_dim * mlp_ratio), Qwen2.5-VL's intermediate_size
    hidden_act: str
    out_width: int  # the merger's output, the decoder's width (Qwen2-VL's hidden_size, Qwen2.5-VL's out_hidden_size)
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rope_theta: float = _DEFAULT_THETA
    window_size: int | None = None  # Qwen2.5-VL: a window's side in pixels
    full_attention_blocks: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend across windows

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """A flattened temporal patch: C * T * p * p values."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_blocks(self) -> int | None:
        """A window's side in merge blocks (transformers' window_size // merge_size // patch_size)."""
        return None if self.window_size is None else self.window_size // self.merge_size // self.patch_size

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> VisionSettings:
        """The tower of a Qwen2-VL / Qwen2.5-VL config.json (its ``model_type`` says which, its ``vision_config``
        the shape; absent keys take transformers' defaults). Settings the tower cannot reproduce are refused."""
        family = config.get("model_type")
        if family not in FAMILIES:
            raise_mismatches([f"model_type {family!r}: expected one of {', '.join(FAMILIES)}"], source,
                             "Qwen2-VL vision towers flexvlm builds")
        vision = {**_DEFAULTS[family], **(config.get("vision_config") or {})}
        theta = (vision.get("rope_parameters") or {}).get("rope_theta", _DEFAULT_THETA)
        if family == "qwen2_vl":
            width, out_width = vision["embed_dim"], vision["hidden_size"]
            mlp_width, windowed = int(vision["embed_dim"] * vision["mlp_ratio"]), {}
        else:
            width, out_width, mlp_width = vision["hidden_size"], vision["out_hidden_size"], vision["intermediate_size"]
            windowed = {"window_size": vision["window_size"],
                        "full_attention_blocks": tuple(vision["fullatt_block_indexes"])}
        settings = cls(family=family, depth=vision["depth"], width=width, num_heads=vision["num_heads"],
                       mlp_width=mlp_width, hidden_act=vision["hidden_act"], out_width=out_width,
                       in_channels=vision["in_channels"], patch_size=vision["patch_size"],
                       temporal_patch_size=vision["temporal_patch_size"], merge_size=vision["spatial_merge_size"],
                       rope_theta=float(theta), **windowed)
        raise_mismatches(settings._problems(), source, "Qwen2-VL vision towers flexvlm builds")
        return settings

    def _problems(self) -> list[str]:
        sizes = {"depth": self.depth, "width": self.width, "num_heads": self.num_heads, "mlp_width": self.mlp_width,
                 "out_width": self.out_width, "in_channels": self.in_channels, "patch_size": self.patch_size,
                 "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size}
        problems = [f"{name} {value!r}: expected a positive int (a square patch as one int)"
                    for name, value in sizes.items() if isinstance(value, bool) or not isinstance(value, int)
                    or value <= 0]
        if problems:
            return problems
        if self.width % self.num_heads:
            problems.append(f"num_heads {self.num_heads} does not divide the width {self.width}")
        elif self.head_dim % 4:
            # half the rotary pairs turn with the row, half with the column
            problems.append(f"head_dim {self.head_dim}: the 2-D RoPE needs a multiple of 4")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r}: the tower implements {', '.join(ACTIVATIONS)}")
        if self.window_size is not None and not self.window_blocks:
            problems.append(f"window_size {self.window_size}: less than one merge block "
                            f"({self.merge_size * self.patch_size} px)")
        outside = [i for i in self.full_attention_blocks if not 0 <= i < self.depth]
        if outside:
            problems.append(f"fullatt_block_indexes {outside}: outside the {self.depth} blocks")
        return problems


def patch_positions(grids: Sequence[Grid], merge_size: int) -> Tensor:
    """(sum of t * h * w, 2) int64: the (row, column) of each patch in its image, in the preprocessing's order
    (merge blocks row-major, each block's patches row-major; every frame alike)."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        cols = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): block by block
        block_major = torch.stack([rows, cols], -1).transpose(1, 2).reshape(h * w, 2)
        out.append(block_major.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: Sequence[Grid], merge_size: int, window_blocks: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Qwen2.5-VL's windows: (the merge blocks of every image in window order, as indices into the row-major
    order: window after window, row-major, each window's blocks row-major; each window's (start, end) in patches
    in that order). Windows are window_blocks x window_blocks merge blocks of one frame, cut at the image's edge."""
    order, windows, offset, start = [], [], 0, 0
    unit = merge_size ** 2  # patches a merge block
    for t, h, w in grids:
        blocks = torch.arange(t * (h // merge_size) * (w // merge_size)).view(t, h // merge_size, w // merge_size)
        for frame in blocks:
            for top in range(0, frame.shape[0], window_blocks):
                for left in range(0, frame.shape[1], window_blocks):
                    window = frame[top:top + window_blocks, left:left + window_blocks].flatten()
                    order.append(window + offset)
                    windows.append((start, start + window.numel() * unit))
                    start += window.numel() * unit
        offset += blocks.numel()
    return torch.cat(order), windows


def _frames(grids: Sequence[Grid]) -> list[tuple[int, int]]:
    """(start, end) in patches of every frame of every image: the full attention's segments."""
    bounds = [0]
    for t, h, w in grids:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return list(zip(bounds[:-1], bounds[1:]))


class PatchEmbed(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        kernel = (s.temporal_patch_size, s.patch_size, s.patch_size)
        self.proj = nn.Conv3d(s.in_channels, s.width, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        # kernel = stride = one whole flattened patch, (C, T, p, p) in this order: the convolution is one matrix
        # product per patch
        return F.linear(patches.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.num_heads, self.head_dim = s.num_heads, s.head_dim
        self.qkv = nn.Linear(s.width, 3 * s.width)
        self.proj = nn.Linear(s.width, s.width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[tuple[int, int]]) -> Tensor:
        q, k, v = self.qkv(x).view(len(x), 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        # (heads, N, d); the rotation in float32, as transformers does it
        q, k = (apply_rope(t.float(), cos, sin).to(t.dtype) for t in (q, k))
        out = torch.cat([F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in segments], 1)
        return self.proj(out.transpose(0, 1).reshape(len(x), -1))


class Mlp(nn.Module):
    """Qwen2-VL's: fc1, activation, fc2."""

    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.fc1 = nn.Linear(s.width, s.mlp_width)
        self.act = ACTIVATIONS[s.hidden_act]()
        self.fc2 = nn.Linear(s.mlp_width, s.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(s.width, s.mlp_width), nn.Linear(s.width, s.mlp_width)
        self.down_proj, self.act = nn.Linear(s.mlp_width, s.width), ACTIVATIONS[s.hidden_act]()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(s: VisionSettings, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=NORM_EPS) if s.family == "qwen2_vl" else RMSNorm(dim, eps=NORM_EPS)


class VisionBlock(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(s, s.width), _norm(s, s.width)
        self.attn = VisionAttention(s)
        self.mlp = Mlp(s) if s.family == "qwen2_vl" else GatedMlp(s)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[tuple[int, int]]) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        merged = s.width * s.merge_size ** 2
        self.ln_q = _norm(s, s.width)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, s.out_width))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class QwenVisionTower(nn.Module):
    """A Qwen2-VL or Qwen2.5-VL vision tower (module docstring). It reads packed images of any grid, so it is no
    ``VisionBackbone`` (which takes a batch of same-sized images)."""

    def __init__(self, settings: VisionSettings) -> None:
        super().__init__()
        self.settings = settings
        self.patch_embed = PatchEmbed(settings)
        self.blocks = nn.ModuleList(VisionBlock(settings) for _ in range(settings.depth))
        self.merger = PatchMerger(settings)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | Sequence[Grid]) -> Tensor:
        """(sum of t * h * w, C * T * p * p) patches and (n, 3) grids -> (sum of t * h * w / m^2, out_width) tokens,
        image after image, each image's row-major on its merged grid."""
        s, grids = self.settings, self._grids(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)
        cos, sin = self._rope(patch_positions(grids, s.merge_size).to(x.device))
        frames = _frames(grids)
        windows = frames  # Qwen2-VL has no windows: every block attends over whole frames
        if s.window_blocks is not None:
            order, windows = window_order(grids, s.merge_size, s.window_blocks)
            order = order.to(x.device)
            x, cos, sin = (t.view(-1, s.merge_size ** 2, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in s.full_attention_blocks else windows)
        tokens = self.merger(x)
        return tokens if s.window_blocks is None else tokens[torch.argsort(order)]

    def _grids(self, pixel_values: Tensor, grid_thw: Tensor | Sequence[Grid]) -> list[Grid]:
        s = self.settings
        grids = [tuple(int(v) for v in grid) for grid in (grid_thw.tolist() if isinstance(grid_thw, Tensor)
                                                          else grid_thw)]
        bad = [g for g in grids if len(g) != 3 or min(g) <= 0 or g[1] % s.merge_size or g[2] % s.merge_size]
        if bad or not grids:
            raise ValueError(f"grid_thw {grids}: expected (t, h, w) of positive ints, h and w multiples of the merge "
                             f"size {s.merge_size}" + (f"; these are not: {bad}" if bad else ""))
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (patches, s.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: the grids {grids} hold {patches} patches of "
                             f"{s.patch_dim} values (C {s.in_channels} x T {s.temporal_patch_size} x "
                             f"{s.patch_size} x {s.patch_size})")
        return grids

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos / sin (N, head_dim), float32, of the patches' (row, column) positions."""
        half = self.settings.head_dim // 2
        # computed on the CPU, as transformers does at its init: a GPU's pow may differ in the last bit
        inv_freq = 1.0 / (self.settings.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        angles = (positions[..., None].float() * inv_freq.to(positions.device)).flatten(1)  # rows' then columns'
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def vision_state(state: StateDict, source: str) -> StateDict:
    """The tower's tensors of a transformers Qwen2-VL / Qwen2.5-VL state dict, under ``visual.`` (as saved) or
    ``model.visual.`` (in memory), with that prefix removed: then they are the tower's names."""
    prefix = next((p for p in VISION_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ValueError(f"{source}: no vision tower tensors (none under {' or '.join(VISION_PREFIXES)})")
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def load_vision_tower(folder: str | Path) -> QwenVisionTower:
    """The vision tower of a Qwen2-VL / Qwen2.5-VL folder (its config.json and weights), loaded strictly."""
    tower = QwenVisionTower(VisionSettings.from_config(read_model_config(folder), f"{folder}/config.json"))
    load_state_dict_strict(tower, vision_state(read_checkpoint(folder), str(folder)), str(folder))
    return tower
