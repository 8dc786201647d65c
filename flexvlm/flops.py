"""FLOPs of a whole greedy generation per sample, vision included (the paper's efficiency measure).

``generation_flops`` measures them with ``FlopCounterMode``; ``generation_cost`` predicts the same
count from shapes alone (no tensors, so 7B shapes cost nothing) and ``paper_scale_table`` applies it
at LLaVA-1.5-7B shapes.

What is counted is what FlopCounterMode counts: matrix products only (mm / addmm / bmm / baddbmm /
convolution; SDPA as its products), 2 FLOPs per multiply-add, biases, norms, softmax, RoPE,
pooling, sorting and gathers free. A Linear on t tokens is 2 t in out; attention of q query rows
over k keys is 4 q k D (QK^T and PV, D = heads x head_dim) whatever the causal or padding mask;
scores alone are 2 q k D.

Notation: g x g low-res tokens, M = (zoom g)^2 high-res (HR) tokens, T text tokens, n prompt
length, L decoder layers, N_SA plain layers, K HR tokens selected per FA layer per step, P the
distinct HR tokens projected per FA layer over the generation, S new tokens.

- Vision, per tower pass, t = g^2 + cls tokens through ``blocks_run`` blocks (the tower stops at the
  block whose output it returns): patch conv 2 g^2 3p^2 C, per block 2t C 3C + 4t^2 C + 2t C^2 +
  4t C C_mlp. Passes: lr_only 1, hd zoom^2 (crops), xattn / flex 1 + zoom^2.
- Projector on g^2 (lr_only), M (hd), g^2 + M (xattn, flex) tokens; mlp{N}x_gelu is one Linear
  C -> D and N - 1 Linears D -> D.
- Forwards: a prefill over n = T + g^2 (hd: T + M), then S - 1 decode steps of one token, step s
  with Nk = n + s keys. Decoder Linears (q, o: D -> D; k, v: D -> kv; gate, up, down) on every token
  of every forward; lm_head on the last row of each forward (S rows).
- attention (every layer, every mode): prefill 4 n^2 D, decode 4 Nk D.
- cross_attention (xattn, layers >= N_SA): prefill 4 n M D, decode 4 M D per step.
- selection_overhead (flex; its fused implementation at alpha = 1, as in generation), with map
  layers N_SA-1 .. L-2 and FA layers N_SA .. L-1 (L - N_SA each): prefill 2 n D per map layer (the
  selecting row's scores) + 4 (n + K) D per FA layer (that row again over the sequence and its K
  selected keys); decode 4 K D per FA layer per step (the row is computed eagerly over Nk + K keys,
  and the map reuses its scores).
- hr_kv_projection (W_K', W_V': D -> kv): 4 D kv per projected token per FA layer, xattn M tokens,
  flex P tokens (K when the selection stays put, M when everything is projected at prefill).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexvlm.models.generation import generate
from flexvlm.models.llm import LlamaConfig
from flexvlm.models.vlm import MODES, FlexVLM

__all__ = [
    "CLIP_VIT_L14_336", "LLAMA_2_7B", "CostBreakdown", "DecoderShape", "VisionShape", "generation_cost",
    "generation_flops", "paper_scale_table",
]


@torch.no_grad()
def generation_flops(
    model: FlexVLM, batch: dict[str, Any], max_new_tokens: int, eos_token_id: int | None, **generate_options: Any
) -> float:
    """Mean FLOPs per sample of ``generate`` on ``batch`` (``generate_options`` go to ``generate``).
    SDPA runs through its math backend so that FlopCounterMode sees its matrix products (the fused
    CPU kernels are invisible to it)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch.get("content_box"),
                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **generate_options)
    return counter.get_total_flops() / batch["prompt_ids"].shape[0]


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower as the backbones run it: patch tokens (plus a CLS token) through the blocks up
    to ``layer`` (Python-style index), the later ones pruned."""

    image_size: int  # input size of one pass
    patch_size: int
    width: int
    depth: int  # blocks of the full tower
    mlp_width: int
    layer: int = -2  # the block whose output is used (LLaVA: the penultimate)
    cls_token: bool = True

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def blocks_run(self) -> int:
        return self.layer % self.depth + 1

    def pass_flops(self) -> int:
        patches = self.grid**2
        tokens = patches + int(self.cls_token)
        c = self.width
        patch_embed = 2 * patches * 3 * self.patch_size**2 * c
        block = 2 * tokens * c * 3 * c + 4 * tokens**2 * c + 2 * tokens * c * c + 2 * 2 * tokens * c * self.mlp_width
        return patch_embed + self.blocks_run * block


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: LlamaConfig) -> DecoderShape:
        return cls(config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads,
                   config.kv_heads, config.vocab_size)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_flops_per_token(self) -> int:
        """One token through one layer's q, k, v, o and gate, up, down projections."""
        d = self.hidden
        return 2 * d * (2 * d + 2 * self.kv_dim) + 2 * 3 * d * self.intermediate

    def attention_flops(self, queries: int, keys: int) -> int:
        """QK^T and PV over all heads (heads x head_dim = hidden)."""
        return 4 * queries * keys * self.hidden


@dataclass(frozen=True)
class CostBreakdown:
    """FLOPs per sample of one greedy generation, by part (see the module docstring)."""

    vision: int
    projector: int
    decoder_linear: int
    attention: int
    lm_head: int
    cross_attention: int = 0
    selection_overhead: int = 0
    hr_kv_projection: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def _projector_flops_per_token(kind: str, in_dim: int, out_dim: int) -> int:
    if kind == "linear":
        return 2 * in_dim * out_dim
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"unknown projector kind {kind!r}")
    return 2 * in_dim * out_dim + (int(match.group(1)) - 1) * 2 * out_dim * out_dim


def generation_cost(
    mode: str,
    vision: VisionShape,
    decoder: DecoderShape,
    zoom: int,
    num_sa_layers: int,
    text_tokens: int,
    new_tokens: int,
    selected_per_row: int = 0,
    projected_hr_tokens: int = 0,
    projector: str = "mlp2x_gelu",
) -> CostBreakdown:
    """FLOPs per sample of a greedy generation of ``new_tokens`` tokens (no early stop) with the
    high-res path "crops". ``text_tokens``: the prompt besides its image placeholder (the padded
    length in a batch: padding rows cost the same). ``selected_per_row`` (K) and
    ``projected_hr_tokens`` (P) are per FA layer and used by flex only."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "flex" and num_sa_layers < 1:
        raise ValueError("flex needs num_sa_layers >= 1: one plain layer's map seeds the selection")
    lr_tokens, hr_tokens = vision.grid**2, (zoom * vision.grid) ** 2
    lr_passes = 0 if mode == "hd" else 1
    hr_passes = 0 if mode == "lr_only" else zoom * zoom
    projected = lr_passes * lr_tokens + (hr_tokens if hr_passes else 0)
    n = text_tokens + (hr_tokens if mode == "hd" else lr_tokens)
    decode_steps = new_tokens - 1  # the prefill yields the first token
    decode_keys = range(n + 1, n + new_tokens)  # keys seen at each decode step
    d = decoder
    hr_layers = d.layers - num_sa_layers if mode in ("xattn", "flex") else 0
    hr_kv_per_token = 2 * 2 * d.hidden * d.kv_dim

    cross_attention = selection_overhead = hr_kv_projection = 0
    if mode == "xattn":
        cross_attention = hr_layers * (d.attention_flops(n, hr_tokens) + decode_steps * d.attention_flops(1, hr_tokens))
        hr_kv_projection = hr_layers * hr_tokens * hr_kv_per_token
    elif mode == "flex":
        k = selected_per_row
        map_scores = hr_layers * 2 * n * d.hidden  # as many map layers as FA layers
        prefill_row = hr_layers * d.attention_flops(1, n + k)
        decode_selected = hr_layers * decode_steps * d.attention_flops(1, k)
        selection_overhead = map_scores + prefill_row + decode_selected
        hr_kv_projection = hr_layers * projected_hr_tokens * hr_kv_per_token

    return CostBreakdown(
        vision=(lr_passes + hr_passes) * vision.pass_flops(),
        projector=projected * _projector_flops_per_token(projector, vision.width, d.hidden),
        decoder_linear=(n + decode_steps) * d.layers * d.linear_flops_per_token(),
        attention=d.layers * (d.attention_flops(n, n) + sum(d.attention_flops(1, keys) for keys in decode_keys)),
        lm_head=new_tokens * 2 * d.hidden * d.vocab,
        cross_attention=cross_attention,
        selection_overhead=selection_overhead,
        hr_kv_projection=hr_kv_projection,
    )


# LLaVA-1.5-7B: CLIP ViT-L/14-336 (penultimate block's output) and LLaMA-2-7B / Vicuna-7B
CLIP_VIT_L14_336 = VisionShape(image_size=336, patch_size=14, width=1024, depth=24, mlp_width=4096, layer=-2)
LLAMA_2_7B = DecoderShape.from_config(LlamaConfig.from_name("llama-2-7b"))


def paper_scale_table(
    text_tokens: int = 80,
    new_tokens: int = 63,
    selected_ratio: float = 0.1,
    num_sa_layers: int = 9,
    vision: VisionShape = CLIP_VIT_L14_336,
    decoder: DecoderShape = LLAMA_2_7B,
    projector: str = "mlp2x_gelu",
) -> dict[str, Any]:
    """TFLOPs per sample of the modes at LLaVA-1.5-7B shapes (the paper's efficiency table), flex
    at three sizes, and the ratios and shares the issue's targets are about. Flex selects
    ``selected_ratio`` of the HR tokens per FA layer per step; the selection stays put (P = K), and
    ``flex_all_projected`` is the upper bound P = M."""

    def cost(mode: str, zoom: int, shape: VisionShape = vision, num_sa: int = 0, projected_all: bool = False):
        hr_tokens = (zoom * shape.grid) ** 2
        k = round(selected_ratio * hr_tokens)
        return generation_cost(mode, shape, decoder, zoom, num_sa, text_tokens, new_tokens, selected_per_row=k,
                               projected_hr_tokens=hr_tokens if projected_all else k, projector=projector)

    hd_shape = replace(vision, image_size=448)  # one 448 px pass with resampled positions: 32 x 32 tokens
    flex = cost("flex", 3, num_sa=num_sa_layers)
    costs = {
        "lr_only": cost("lr_only", 1),
        "hd_448": cost("hd", 1, hd_shape),
        "hd_1008": cost("hd", 3),
        "xattn": cost("xattn", 3),
        "flex": flex,
    }
    flex_by_zoom = {zoom: cost("flex", zoom, num_sa=num_sa_layers).total for zoom in (2, 3, 4)}
    # affine in M = (zoom g)^2: the middle size lies on the line through the two ends
    (m0, f0), (m1, f1), (m2, f2) = (((zoom * vision.grid) ** 2, flops) for zoom, flops in flex_by_zoom.items())
    on_line = f0 + (f2 - f0) * (m1 - m0) / (m2 - m0)
    tera = 1e12
    return {
        "tflops": {mode: c.total / tera for mode, c in costs.items()},
        "flex_by_size": {str(zoom * vision.image_size): flops / tera for zoom, flops in flex_by_zoom.items()},
        "flex_all_projected": cost("flex", 3, num_sa=num_sa_layers, projected_all=True).total / tera,
        "selection_overhead_share": flex.selection_overhead / flex.total,
        "hr_kv_projection_share": flex.hr_kv_projection / flex.total,
        "ratios": {
            "flex/xattn": flex.total / costs["xattn"].total,
            "flex/hd_1008": flex.total / costs["hd_1008"].total,
            "flex/hd_448": flex.total / costs["hd_448"].total,
        },
        # K = round(ratio x M) is the only non-affine term, hence a relative tolerance
        "flex_linear_in_hr_tokens": abs(f1 - on_line) / f1 < 1e-4,
        "flex_parts_tflops": {part: flops / tera for part, flops in asdict(flex).items()},
        "assumptions": {"text_tokens": text_tokens, "new_tokens": new_tokens, "selected_ratio": selected_ratio,
                        "selected_per_row": round(selected_ratio * (3 * vision.grid) ** 2),
                        "num_sa_layers": num_sa_layers},
    }
