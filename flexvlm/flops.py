"""FLOPs of a whole greedy generation per sample, vision included (the paper's efficiency measure).

``generation_flops`` measures them with ``FlopCounterMode``; ``generation_cost`` predicts the same
count from shapes alone (no tensors, so 7B shapes cost nothing), ``paper_scale_table`` applies it
at LLaVA-1.5-7B shapes and ``architecture_scale_table`` at the published shapes of SmolVLM and
LLaVA-OneVision (``python -m flexvlm.flops`` prints that table).

What is counted is what FlopCounterMode counts: matrix products only (mm / addmm / bmm / baddbmm /
convolution; SDPA as its products), 2 FLOPs per multiply-add, biases, norms, softmax, RoPE,
pooling, sorting, gathers, reshapes (pixel shuffle), interpolation (the anyres shrink) and
embedding lookups (newline / special text tokens) free. A Linear on t tokens is 2 t in out;
attention of q query rows over k keys is 4 q k D (QK^T and PV, D = heads x head_dim) whatever the
causal or padding mask; scores alone are 2 q k D.

An image's geometry is an ``ImageCost``: per mode, its tower passes, the sequence positions it takes
(image tokens and any newline / special text tokens the architecture adds), the M high-res (HR)
tokens beside the sequence, and the tokens its projector runs on. ``ImageCost.llava`` is LLaVA-1.5's
(one low-res pass of g x g tokens, zoom^2 crops giving M = (zoom g)^2 HR tokens),
``ImageCost.smolvlm`` SmolVLM / Idefics3's tiles and global view, ``ImageCost.onevision``
LLaVA-OneVision's base view and anyres grid (each constructor's docstring says what goes where).

Notation: T text tokens, n prompt length (T + the image's sequence positions of the mode), L
decoder layers, N_SA plain layers, K HR tokens selected per FA layer per step, P the distinct HR
tokens projected per FA layer over the generation, S new tokens.

- Vision, per tower pass, t = g^2 (+1 with a CLS token) tokens through ``blocks_run`` blocks (the
  tower stops at the block whose output it returns): patch conv 2 g^2 3p^2 C, per block
  2t C 3C + 4t^2 C + 2t C^2 + 4t C C_mlp. Passes: ``ImageCost.passes(mode)``.
- Projector on ``ImageCost.projected_tokens(mode)`` tokens: linear is one Linear C_in -> D,
  mlp{N}x_gelu one Linear C_in -> D and N - 1 Linears D -> D.
- Forwards: a prefill over n tokens, then S - 1 decode steps of one token, step s with Nk = n + s
  keys. Decoder Linears (q, o: D -> D; k, v: D -> kv; gate, up, down) on every token of every
  forward; lm_head on the last row of each forward (S rows).
- attention (every layer, every mode): prefill 4 n^2 D, decode 4 Nk D.
- cross_attention (xattn, layers >= N_SA): prefill 4 n M D, decode 4 M D per step.
- selection_overhead (flex; its fused implementation, as in generation), with map layers
  N_SA-1 .. L-2 and FA layers N_SA .. L-1 (L - N_SA each), at the prefill and at every decode step:
  2 h w D per map layer (the selecting row's scores of the h x w low-res image keys: its map, with
  the log-sum-exp the sequence attention's kernel returns) + 4 K D per FA layer (that row over its K
  selected keys alone, merged with its sequence attention through the two log-sum-exps).
- hr_kv_projection (W_K', W_V': D -> kv): 4 D kv per projected token per FA layer, xattn M tokens,
  flex P tokens (K when the selection stays put, M when everything is projected at prefill).
- A token reduction (hd, ``flexvlm.reduction``): every layer after a stage's drop sees n_l = n minus
  the image tokens dropped so far, in its Linears, its prefill attention and its decode keys; rating
  costs 2 n_l D (the prompt's last row's scores) per stage, plus its q, k and v projections of the
  n_l tokens, 2 n_l D (D + 2 kv), where the stage previews the layer after its drop (PyramidDrop).
  A reduction whose counts adapt to the sample (SparseVLM: the rank of its raters' attention) is
  predicted at its stages' ``keep``, the most it keeps (merged tokens included; all of them without a
  budget), with one rating row; its other raters, their choice, the rank and the recycling's
  clustering are only measured (``generation_flops``).
- VisionZip (hd, before the decoder; LLaVA-1.5's geometry): each tower pass of t = g^2 (+1) tokens leaves
  k of them (``VisionZip.pass_tokens``) for the projector and the sequence, so every layer sees the
  shorter prompt; reading the attention of the tower's returned layer again costs, per pass, the
  rating rows' q (r = 1, the CLS token; without one r = t) and every token's k, 2 (r + t) C^2, and
  their scores, 2 r t C; the merge compares the o patches that join a target with the c targets'
  keys, 2 o c C / heads.
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
from flexvlm.reduction import ImageTokenReduction, TokenReduction, VisionZip, kept_count

__all__ = [
    "ARCHITECTURES", "ArchitectureShape", "CLIP_VIT_L14_336", "LLAMA_2_7B", "CostBreakdown", "DecoderShape",
    "ImageCost", "VisionShape", "architecture_scale_table", "format_architecture_table", "generation_cost",
    "generation_flops", "paper_scale_table",
]


@torch.no_grad()
def generation_flops(
    model: FlexVLM, batch: dict[str, Any], max_new_tokens: int, eos_token_id: int | None, **generate_options: Any
) -> float:
    """Mean FLOPs per sample of ``generate`` on ``batch`` (``generate_options`` go to ``generate``).
    SDPA runs through its math backend so that FlopCounterMode sees its matrix products (the fused
    CPU kernels are invisible to it); the CPU kernel that returns the log-sum-exp (``SdpaAttention``'s,
    called by its aten name) is counted as SDPA's products."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_kernel_flops})
    with sdpa_kernel(SDPBackend.MATH), counter:
        generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch.get("content_box"),
                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **generate_options)
    return counter.get_total_flops() / batch["prompt_ids"].shape[0]


def _attention_kernel_flops(query_shape: torch.Size, key_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    """A fused attention kernel's products: QK^T and PV, 4 q k d per head and sample, the mask ignored."""
    batch, heads, rows, head_dim = query_shape
    return 4 * batch * heads * rows * key_shape[2] * head_dim


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower as the backbones run it: patch tokens (plus a CLS token) through the blocks up
    to ``layer`` (Python-style index), the later ones pruned. SigLIP (SmolVLM, LLaVA-OneVision):
    ``cls_token=False``, ``layer=-1``; ``final_norm``: the tokens after the tower's last norm
    (SmolVLM's ``last_hidden_state``), free in this count like every norm, kept for the record."""

    image_size: int  # input size of one pass
    patch_size: int
    width: int
    depth: int  # blocks of the full tower
    mlp_width: int
    layer: int = -2  # the block whose output is used (LLaVA: the penultimate)
    cls_token: bool = True
    final_norm: bool = False
    heads: int | None = None  # attention heads; only VisionZip's merge reads them (its keys are C / heads wide)

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


@dataclass(frozen=True)
class ImageCost:
    """One image's geometry as the cost model needs it: for each mode the tower passes, the sequence
    positions the image takes, the tokens the projector runs on; the M high-res tokens beside the
    sequence (xattn, flex). lr_only runs the low-res path, xattn and flex the low-res and the high-res
    paths, hd its own (what the original model does). Build one with a constructor (``llava``,
    ``smolvlm``, ``onevision``, ``from_layout``)."""

    lr_passes: int  # tower passes of the low-res path (lr_only; xattn and flex add hr_passes)
    hr_passes: int  # tower passes of the high-res path (xattn, flex)
    hd_passes: int  # tower passes in hd
    lr_sequence_tokens: int  # sequence positions of the image in lr_only, xattn, flex (image + special text tokens)
    hd_sequence_tokens: int  # sequence positions of the image in hd
    hr_tokens: int  # M: high-res tokens beside the sequence (xattn, flex)
    lr_projected: int  # tokens the projector runs on for the low-res path
    hr_projected: int  # ... for the high-res path (can exceed M: LLaVA-OneVision projects before unpadding)
    hd_projected: int  # ... in hd
    hd_image_tokens: int  # the image tokens among hd's sequence positions (what a token reduction drops from)
    projector_in: int  # width of the projector's input tokens
    projector: str = "mlp2x_gelu"  # "linear" or "mlp{N}x_gelu" (``_projector_flops_per_token``)

    def passes(self, mode: str) -> int:
        return {"lr_only": self.lr_passes, "hd": self.hd_passes}.get(mode, self.lr_passes + self.hr_passes)

    def sequence_tokens(self, mode: str) -> int:
        return self.hd_sequence_tokens if mode == "hd" else self.lr_sequence_tokens

    def projected_tokens(self, mode: str) -> int:
        return {"lr_only": self.lr_projected, "hd": self.hd_projected}.get(mode, self.lr_projected + self.hr_projected)

    @property
    def lr_grid_tokens(self) -> int:
        """h w, the cells of the low-res grid a selecting map covers: one per token of the low-res view,
        the tokens its projector runs on (``lr_projected``)."""
        return self.lr_projected

    def projector_flops_per_token(self, out_dim: int) -> int:
        return _projector_flops_per_token(self.projector, self.projector_in, out_dim)

    @classmethod
    def llava(cls, vision: VisionShape, zoom: int, projector: str = "mlp2x_gelu") -> ImageCost:
        """LLaVA-1.5 (the high-res path "crops"): one low-res pass of g x g tokens, zoom^2 crop passes
        stitched into M = (zoom g)^2 high-res tokens; hd puts the M tokens in the sequence; the
        projector (C -> D) runs per token on what each mode uses."""
        lr, hr = vision.grid**2, (zoom * vision.grid) ** 2
        return cls(lr_passes=1, hr_passes=zoom * zoom, hd_passes=zoom * zoom, lr_sequence_tokens=lr,
                   hd_sequence_tokens=hr, hr_tokens=hr, lr_projected=lr, hr_projected=hr, hd_projected=hr,
                   hd_image_tokens=hr, projector_in=vision.width, projector=projector)

    @classmethod
    def smolvlm(cls, vision: VisionShape, rows: int, cols: int, scale_factor: int,
                tile_tag_tokens: int = 1) -> ImageCost:
        """SmolVLM / Idefics3: rows x cols tiles and one global view (rows = cols = 0: the image is its
        own only view), each a pass of the whole SigLIP tower; the connector pixel-shuffles a view's
        g^2 patches into t^2 = g^2 / s^2 tokens of width C s^2 and maps them to D with one Linear
        (no bias). In the sequence (``image_prompt``): hd, per tile ``<fake_token_around_image>``,
        ``<row_i_col_j>`` (``tile_tag_tokens`` tokens: 1 where the tokenizer has it as an added token)
        and its t^2 tokens, a newline after each row of tiles, then a newline,
        ``<fake_token_around_image><global-img>``, the global view's t^2 tokens and a closing
        ``<fake_token_around_image>``; the other modes the global view's part alone (t^2 + 3). The
        newlines are counted one token each (a BPE tokenizer may merge the last row's with the one
        after it: one token fewer). M = rows cols t^2, the tiles' tokens."""
        grid = vision.grid
        if scale_factor < 1 or grid % scale_factor:
            raise ValueError(f"scale_factor {scale_factor} must divide the tower's grid {grid}")
        if (rows == 0) != (cols == 0) or rows < 0 or cols < 0:
            raise ValueError(f"rows {rows} and cols {cols}: both positive, or both 0 (a single view)")
        t2, tiles = (grid // scale_factor) ** 2, rows * cols
        global_view = 3 + t2  # <fake><global-img> ... <fake>
        hd_sequence = tiles * (1 + tile_tag_tokens + t2) + rows + 1 + global_view if tiles else global_view
        return cls(lr_passes=1, hr_passes=tiles, hd_passes=tiles + 1, lr_sequence_tokens=global_view,
                   hd_sequence_tokens=hd_sequence, hr_tokens=tiles * t2, lr_projected=t2, hr_projected=tiles * t2,
                   hd_projected=(tiles + 1) * t2, hd_image_tokens=(tiles + 1) * t2 if tiles else t2,
                   projector_in=vision.width * scale_factor**2, projector="linear")

    @classmethod
    def onevision(cls, vision: VisionShape, grid_rows: int, grid_cols: int, feature_grid: tuple[int, int],
                  projector: str = "mlp2x_gelu") -> ImageCost:
        """LLaVA-OneVision: a base view and grid_rows x grid_cols anyres tiles, each a pass of the
        SigLIP tower, g x g tokens a view. The projector runs on every view's tokens, the tiles'
        before the grid is unpadded and shrunk (what transformers computes); ``feature_grid`` (h, w) is
        the grid after both (``OneVisionLayout.feature_grid``). hd: the base view's g^2 tokens, then the
        h x w grid tokens with a newline after each row (the learned ``image_newline``, no projector),
        g^2 + h (w + 1); lr_only, xattn, flex: the base view's g^2 tokens and one newline, with
        M = h w grid tokens beside the sequence."""
        if grid_rows < 1 or grid_cols < 1:
            raise ValueError(f"grid {grid_rows} x {grid_cols}: at least one tile")
        g2, tiles, (h, w) = vision.grid**2, grid_rows * grid_cols, feature_grid
        return cls(lr_passes=1, hr_passes=tiles, hd_passes=1 + tiles, lr_sequence_tokens=g2 + 1,
                   hd_sequence_tokens=g2 + h * (w + 1), hr_tokens=h * w, lr_projected=g2, hr_projected=tiles * g2,
                   hd_projected=(1 + tiles) * g2, hd_image_tokens=g2 + h * (w + 1), projector_in=vision.width,
                   projector=projector)

    @classmethod
    def from_layout(cls, vision: VisionShape, layout: Any, scale_factor: int | None = None, **options: Any
                    ) -> ImageCost:
        """The cost of an image as a preprocessing laid it out: a SmolVLM ``ImageLayout`` (with the
        connector's ``scale_factor``) or a LLaVA-OneVision ``OneVisionLayout``; ``options`` go to the
        constructor. The layout's views must be the tower's input."""
        from flexvlm.architectures.llava_onevision.preprocess import OneVisionLayout
        from flexvlm.architectures.smolvlm.preprocess import ImageLayout

        if isinstance(layout, ImageLayout):
            if scale_factor is None:
                raise ValueError("a SmolVLM layout needs the connector's scale_factor")
            if layout.tile_size // vision.patch_size != vision.grid:
                raise ValueError(f"tiles of {layout.tile_size} px give another grid than the tower's {vision.grid}")
            return cls.smolvlm(vision, layout.rows, layout.cols, scale_factor, **options)
        if isinstance(layout, OneVisionLayout):
            if layout.view_tokens != vision.grid:
                raise ValueError(f"views of {layout.view_tokens} tokens a side, the tower's grid is {vision.grid}")
            return cls.onevision(vision, *layout.grid, layout.feature_grid, **options)
        raise TypeError(f"expected an ImageLayout or a OneVisionLayout, got {type(layout).__name__}")


def generation_cost(
    mode: str,
    vision: VisionShape,
    decoder: DecoderShape,
    image: ImageCost,
    num_sa_layers: int,
    text_tokens: int,
    new_tokens: int,
    selected_per_row: int = 0,
    projected_hr_tokens: int = 0,
    reduction: TokenReduction | ImageTokenReduction | None = None,
) -> CostBreakdown:
    """FLOPs per sample of a greedy generation of ``new_tokens`` tokens (no early stop) of one image
    of geometry ``image`` (``ImageCost``, built for this ``vision`` tower). ``text_tokens``: the prompt
    besides the image's positions (the padded length in a batch: padding rows cost the same, until a
    token reduction's first drop, after which a batch is as long as its longest sample).
    ``selected_per_row`` (K) and ``projected_hr_tokens`` (P) are per FA layer and used by flex only;
    ``reduction`` (hd only) shortens the sequence of the layers after each of its stages, or, before
    the decoder (VisionZip), of every layer."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
    if mode == "flex" and num_sa_layers < 1:
        raise ValueError("flex needs num_sa_layers >= 1: one plain layer's map seeds the selection")
    if reduction is not None and mode != "hd":
        raise ValueError(f"a token reduction acts on hd's sequence, not on mode {mode!r}'s")
    zipping = 0
    if isinstance(reduction, ImageTokenReduction):
        image, zipping = _zipped(reduction, vision, image)
        reduction = None
    hr_tokens = image.hr_tokens
    n = text_tokens + image.sequence_tokens(mode)
    decode_steps = new_tokens - 1  # the prefill yields the first token
    d = decoder
    lengths, rating = _reduced_lengths(reduction, d, n, image.hd_image_tokens)
    hr_layers = d.layers - num_sa_layers if mode in ("xattn", "flex") else 0
    hr_kv_per_token = 2 * 2 * d.hidden * d.kv_dim

    cross_attention = selection_overhead = hr_kv_projection = 0
    if mode == "xattn":
        cross_attention = hr_layers * (d.attention_flops(n, hr_tokens) + decode_steps * d.attention_flops(1, hr_tokens))
        hr_kv_projection = hr_layers * hr_tokens * hr_kv_per_token
    elif mode == "flex":
        map_scores = 2 * image.lr_grid_tokens * d.hidden  # as many map layers as FA layers
        selected = d.attention_flops(1, selected_per_row)
        selection_overhead = new_tokens * hr_layers * (map_scores + selected)  # every forward: prefill, steps
        hr_kv_projection = hr_layers * projected_hr_tokens * hr_kv_per_token

    return CostBreakdown(
        vision=image.passes(mode) * vision.pass_flops(),
        projector=image.projected_tokens(mode) * image.projector_flops_per_token(d.hidden),
        decoder_linear=sum(length + decode_steps for length in lengths) * d.linear_flops_per_token(),
        # each decode step s = 1 .. S - 1 sees the layer's prompt keys and s more
        attention=sum(d.attention_flops(length, length) + sum(d.attention_flops(1, length + s)
                                                              for s in range(1, new_tokens))
                      for length in lengths),
        lm_head=new_tokens * 2 * d.hidden * d.vocab,
        cross_attention=cross_attention,
        selection_overhead=selection_overhead + rating + zipping,
        hr_kv_projection=hr_kv_projection,
    )


def _reduced_lengths(reduction: TokenReduction | None, d: DecoderShape, n: int, image_tokens: int
                     ) -> tuple[list[int], int]:
    """The prompt length each layer sees under ``reduction`` (all n without one), and the FLOPs of
    rating the tokens (one rating row, the prompt's last): a stage rated by the layer before its drop
    reuses that layer's keys (2 n D, the row's scores), a previewed one computes q, k and v of the n
    tokens first (``SequencePruning._previewed_scores``)."""
    lengths = [n] * d.layers
    rating = 0
    for stage in reduction.check(d.layers) if reduction is not None else []:
        before = lengths[stage.prune_before - 1]
        rating += 2 * before * d.hidden
        if stage.rate_at == stage.prune_before:
            rating += 2 * before * d.hidden * (d.hidden + 2 * d.kv_dim)
        dropped = image_tokens - int(kept_count(torch.tensor(image_tokens), stage.keep))
        lengths[stage.prune_before:] = [n - dropped] * (d.layers - stage.prune_before)
    return lengths, rating


def _zipped(reduction: ImageTokenReduction, vision: VisionShape, image: ImageCost) -> tuple[ImageCost, int]:
    """hd's ``image`` as VisionZip hands it to the projector and the decoder, and the FLOPs of reading its
    tower's attention and of its merge (the module docstring's last item)."""
    if not isinstance(reduction, VisionZip):
        raise TypeError(f"no cost model for {reduction.describe()}: flexvlm.flops counts VisionZip's")
    passes, patches = image.hd_passes, vision.grid**2
    if not image.hd_image_tokens == image.hd_sequence_tokens == image.hd_projected == passes * patches:
        raise ValueError(f"{reduction.describe()} reduces LLaVA-1.5's hd tokens (ImageCost.llava), not this image's")
    if vision.heads is None:
        raise ValueError(f"{reduction.describe()} merges by keys of C / heads: give the VisionShape's heads")
    dominant, contextual = reduction.split(patches, vision.cls_token)
    kept = passes * reduction.pass_tokens(patches, vision.cls_token)
    tokens = patches + int(vision.cls_token)
    rows = 1 if vision.cls_token else tokens
    joining = patches - dominant - contextual
    per_pass = (2 * (rows + tokens) * vision.width**2 + 2 * rows * tokens * vision.width
                + 2 * joining * contextual * (vision.width // vision.heads))
    zipped = replace(image, hd_sequence_tokens=kept, hd_projected=kept, hd_image_tokens=kept)
    return zipped, passes * per_pass


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
        image = ImageCost.llava(shape, zoom, projector)
        k = round(selected_ratio * image.hr_tokens)
        return generation_cost(mode, shape, decoder, image, num_sa, text_tokens, new_tokens, selected_per_row=k,
                               projected_hr_tokens=image.hr_tokens if projected_all else k)

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


# --- SmolVLM and LLaVA-OneVision at their published shapes -------------------------------------------
#
# SmolVLM-256M / 500M (HuggingFaceTB/SmolVLM-256M-Instruct, -500M-Instruct; Idefics3ForConditionalGeneration):
# the model cards name google/siglip-base-patch16-512 and SmolLM2-135M / 360M-Instruct; config.json (as
# copied in Mattimax/DATA-AI_Smol256M-Instruct and vidore/ColSmolVLM-Instruct-500M-base, and in the
# test fixtures of several ports that mirror it): scale_factor 4, vision hidden 768, intermediate 3072,
# 12 layers, image 512, patch 16; text 576 / 1536 / 30 layers / 9 heads / 3 kv heads (256M) and
# 960 / 2560 / 15 heads / 5 kv heads (500M), vocab 49280; SmolLM2-360M's own config.json:
# 32 layers. processor_config.json image_seq_len 64; preprocessor_config.json (SmolVLM-256M-Base, the
# SmolVLM2-256M processors, transformers' SmolVLM docs: "4 * 512") max_image_size.longest_edge 512,
# size.longest_edge 2048.
SIGLIP_B16_512 = VisionShape(image_size=512, patch_size=16, width=768, depth=12, mlp_width=3072, layer=-1,
                             cls_token=False, final_norm=True)
SMOLLM2_135M = DecoderShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49280)
SMOLLM2_360M = DecoderShape(hidden=960, intermediate=2560, layers=32, heads=15, kv_heads=5, vocab=49280)
# SmolVLM-2.2B (HuggingFaceTB/SmolVLM-Instruct; Idefics3): config.json (its copies in
# chflame163/ComfyUI_LayerStyle and frontrx/ECGv3, SmolVLM-Base): scale_factor 3, image_seq_len 81, vision
# (SigLIP so400m patch14 384) hidden 1152, intermediate 4304, 27 layers, image 384, patch 14; text
# (SmolLM2-1.7B) 2048 / 8192 / 24 layers / 32 heads / 32 kv heads (head_dim 64), vocab 49155;
# preprocessor_config.json max_image_size.longest_edge 384, size.longest_edge 1536.
SIGLIP_SO400M_384_27 = VisionShape(image_size=384, patch_size=14, width=1152, depth=27, mlp_width=4304, layer=-1,
                                   cls_token=False, final_norm=True)
SMOLLM2_1_7B = DecoderShape(hidden=2048, intermediate=8192, layers=24, heads=32, kv_heads=32, vocab=49155)
# LLaVA-OneVision 0.5B / 7B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf): transformers'
# convert_llava_onevision_weights_to_hf.py builds vision_config = SiglipVisionConfig(hidden 1152, image 384,
# intermediate 4304, 16 heads, 26 layers ("drop the last layer"), patch 14, vision_use_head False),
# vision_feature_layer -1 (all 26 blocks run), a 2-layer GELU projector, the text config of
# Qwen/Qwen2-0.5B-Instruct / Qwen2-7B-Instruct (896 / 4864 / 24 layers / 14 heads / 2 kv heads;
# 3584 / 18944 / 28 / 28 / 4), the vocab resized to vocab + 2 padded to a multiple of 64: 151936 -> 152000,
# 152064 -> 152128 (the 7B value as published; 152000 is also llava-hf/llava-interleave-qwen-0.5b-hf's).
# image_grid_pinpoints (the -7b-ov-hf config.json, e.g. its copy mgoin/llava-onevision-qwen2-7b-ov-hf-bnb-
# full-4bit): every (384 i, 384 j), i, j in 1..6; vision_aspect_ratio anyres_max_9 (the processor's default).
SIGLIP_SO400M_384_26 = VisionShape(image_size=384, patch_size=14, width=1152, depth=26, mlp_width=4304, layer=-1,
                                   cls_token=False)
QWEN2_0_5B = DecoderShape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=152000)
QWEN2_7B = DecoderShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152128)
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


@dataclass(frozen=True)
class ArchitectureShape:
    """A released VLM's shapes for ``architecture_scale_table``; ``family`` "smolvlm" or "onevision"."""

    name: str
    checkpoint: str
    family: str
    vision: VisionShape
    decoder: DecoderShape
    scale_factor: int = 0  # SmolVLM: the connector's pixel shuffle
    longest_edge: int = 0  # SmolVLM: the processor's size.longest_edge (its tiles: max_image_size = vision.image_size)
    pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-OneVision: image_grid_pinpoints
    max_views: int = 9  # LLaVA-OneVision: anyres_max_N

    def image(self, image_size: tuple[int, int], longest_edge: int | None = None) -> tuple[ImageCost, str]:
        """The ``ImageCost`` of an image of (height, width) as the architecture's preprocessing lays it
        out (SmolVLM: at ``longest_edge``, by default the processor's), and its layout in words."""
        if self.family == "smolvlm":
            from flexvlm.architectures.smolvlm.preprocess import _fit_longest_edge, _round_up_to_tiles

            tile = self.vision.image_size
            resized = _fit_longest_edge(*image_size, longest_edge or self.longest_edge)
            height, width = _round_up_to_tiles(*resized, tile)
            rows, cols = (height // tile, width // tile) if (height, width) != (tile, tile) else (0, 0)
            return (ImageCost.smolvlm(self.vision, rows, cols, self.scale_factor),
                    f"{rows} x {cols} tiles + global view" if rows else "one view")
        from flexvlm.architectures.llava_onevision.preprocess import OneVisionProcessing, image_layout

        settings = OneVisionProcessing(tile_size=self.vision.image_size, patch_size=self.vision.patch_size,
                                       pinpoints=self.pinpoints, max_views=self.max_views,
                                       image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
        layout = image_layout(image_size, settings)
        shrunk = layout.feature_grid != layout.unpadded_grid
        words = (f"base + {layout.grid[0]} x {layout.grid[1]} tiles, grid "
                 + (f"{layout.unpadded_grid[0]} x {layout.unpadded_grid[1]} shrunk to " if shrunk else "")
                 + f"{layout.feature_grid[0]} x {layout.feature_grid[1]}")
        return ImageCost.from_layout(self.vision, layout), words


ARCHITECTURES: tuple[ArchitectureShape, ...] = (
    ArchitectureShape("SmolVLM-256M", "HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm", SIGLIP_B16_512,
                      SMOLLM2_135M, scale_factor=4, longest_edge=2048),
    ArchitectureShape("SmolVLM-500M", "HuggingFaceTB/SmolVLM-500M-Instruct", "smolvlm", SIGLIP_B16_512,
                      SMOLLM2_360M, scale_factor=4, longest_edge=2048),
    ArchitectureShape("SmolVLM-2.2B", "HuggingFaceTB/SmolVLM-Instruct", "smolvlm", SIGLIP_SO400M_384_27,
                      SMOLLM2_1_7B, scale_factor=3, longest_edge=1536),
    ArchitectureShape("LLaVA-OV-0.5B", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "onevision",
                      SIGLIP_SO400M_384_26, QWEN2_0_5B, pinpoints=ONEVISION_PINPOINTS, max_views=9),
    ArchitectureShape("LLaVA-OV-7B", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "onevision",
                      SIGLIP_SO400M_384_26, QWEN2_7B, pinpoints=ONEVISION_PINPOINTS, max_views=9),
)

# (image (height, width), SmolVLM longest_edge in tiles or None for the processor's): SmolVLM resizes every
# image to its longest_edge, so a square image gives 4 x 4 tiles at the default and 2 x 2 at 2 tiles;
# LLaVA-OneVision picks its tiles by the image's size: 2 x 2 at 768 px, 3 x 3 at 1 MP, 6 x 6 at 4 MP,
# whose 162 x 162 grid anyres_max_9 shrinks to 81 x 81
SMOLVLM_IMAGES = (((1024, 1024), 2), ((1024, 1024), None))
ONEVISION_IMAGES = ((768, 768), (1024, 1024), (2048, 2048))


def architecture_scale_table(
    text_tokens: int = 80,
    new_tokens: int = 63,
    selected_ratio: float = 0.1,
    sa_fraction: float = 9 / 32,
    architectures: tuple[ArchitectureShape, ...] = ARCHITECTURES,
) -> dict[str, Any]:
    """TFLOPs per sample of lr_only, hd (= the original model), xattn and flex for each architecture
    at the images of ``SMOLVLM_IMAGES`` / ``ONEVISION_IMAGES``, with the same prompt and answer lengths
    as ``paper_scale_table``. Flex: N_SA = round(sa_fraction L) (the release's 9 of 32), K =
    round(selected_ratio M) per FA layer per step, a selection that stays put (P = K); xattn: N_SA 0.

    Not found in the published files and so assumed: how many tokens SmolVLM's tokenizer makes of
    ``<row_i_col_j>`` (counted 1: SmolVLM-256M / 500M list them as added tokens; SmolVLM-Instruct's
    added_tokens.json does not, so its hd sequence is a few tokens per tile longer than counted here)
    and whether it merges the two newlines after the last row of tiles (counted 2); the 0.5B OneVision
    vocabulary (152000, derived from the conversion script's resize rule)."""
    tera = 1e12
    models = {}
    for arch in architectures:
        num_sa = round(sa_fraction * arch.decoder.layers)
        if arch.family == "smolvlm":
            images = [(size, tiles and tiles * arch.vision.image_size) for size, tiles in SMOLVLM_IMAGES]
        else:
            images = [(size, None) for size in ONEVISION_IMAGES]
        rows = []
        for size, longest_edge in images:
            image, layout = arch.image(size, longest_edge)
            k = round(selected_ratio * image.hr_tokens)
            costs = {mode: generation_cost(mode, arch.vision, arch.decoder, image, num_sa if mode == "flex" else 0,
                                           text_tokens, new_tokens, selected_per_row=k, projected_hr_tokens=k)
                     for mode in MODES}
            flex, hd, xattn = costs["flex"], costs["hd"], costs["xattn"]
            rows.append({
                "image": f"{size[0]} x {size[1]}" + (f", longest_edge {longest_edge}" if longest_edge else ""),
                "layout": layout,
                "tower_passes": {mode: image.passes(mode) for mode in ("lr_only", "hd", "flex")},
                "sequence_tokens": {"hd": image.hd_sequence_tokens, "flex": image.lr_sequence_tokens},
                "hr_tokens": image.hr_tokens,
                "selected_per_row": k,
                "tflops": {mode: c.total / tera for mode, c in costs.items()},
                "vision_tflops": flex.vision / tera,
                "flex/hd": flex.total / hd.total,
                "flex/xattn": flex.total / xattn.total,
                "flex/hd_without_vision": (flex.total - flex.vision) / (hd.total - hd.vision),
            })
        models[arch.name] = {"checkpoint": arch.checkpoint, "layers": arch.decoder.layers, "num_sa_layers": num_sa,
                             "rows": rows}
    return {"models": models,
            "assumptions": {"text_tokens": text_tokens, "new_tokens": new_tokens, "selected_ratio": selected_ratio,
                            "sa_fraction": sa_fraction}}


def format_architecture_table(table: dict[str, Any]) -> str:
    """``architecture_scale_table``'s result as a markdown table."""
    lines = ["| model (N_SA / L) | image | layout | tower passes hd / flex | image tokens in the sequence hd / flex "
             "| high-res M (K) | TFLOPs lr_only | hd | xattn | flex | of which vision | flex / hd | flex / xattn "
             "| flex / hd without vision |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in table["models"].items():
        for row in model["rows"]:
            t = row["tflops"]
            lines.append(
                f"| {name} ({model['num_sa_layers']} / {model['layers']}) | {row['image']} | {row['layout']} "
                f"| {row['tower_passes']['hd']} / {row['tower_passes']['flex']} "
                f"| {row['sequence_tokens']['hd']:,} / {row['sequence_tokens']['flex']:,} "
                f"| {row['hr_tokens']:,} ({row['selected_per_row']:,}) | {t['lr_only']:.2f} | {t['hd']:.2f} "
                f"| {t['xattn']:.2f} | {t['flex']:.2f} | {row['vision_tflops']:.2f} | {row['flex/hd']:.3f} "
                f"| {row['flex/xattn']:.3f} | {row['flex/hd_without_vision']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m flexvlm.flops
    print(format_architecture_table(architecture_scale_table()))
