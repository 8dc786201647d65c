"""Vision backbones that return the patch tokens of one transformer layer, or the positions of one
stage's feature map of a convolutional network.

Every backbone maps normalised images (B, 3, H, W) to row-major patch tokens (B, H/p * W/p, C),
without class or other prefix tokens. Any H, W that are multiples of the patch size work: the
position embeddings are resampled bicubically (the "whole image at any size" high-res path).
The ViT towers also give what their returned layer's attention computed for those tokens
(``token_attention``), which a reduction of the image tokens before the decoder reads (VisionZip).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from timm.layers import Attention as TimmAttention
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block as TimmBlock
from torch import Tensor, nn

from flexvlm.weights import load_state_dict_strict, read_state_dict

__all__ = ["VisionBackbone", "TimmBackbone", "TimmFeatureMapBackbone", "OpenClipBackbone", "PatchMLPBackbone",
           "TokenAttention"]

def _block_index(layer: int, depth: int, what: str = "layer", parts: str = "blocks") -> int:
    """Python-style (negative counts from the end) index into `depth` blocks, as a positive index."""
    if not -depth <= layer < depth:
        raise ValueError(f"{what} {layer} is out of range for {depth} {parts}")
    return layer % depth


def _resample_pos_embed(pos_embed: Tensor, grid: int, new_grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Position embeddings (1, num_prefix + grid*grid, C) resampled bicubically to `new_grid`."""
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new_grid), old_size=[grid, grid], num_prefix_tokens=num_prefix
    )


@dataclass
class TokenAttention:
    """What the layer a ViT tower returns computed for a batch's patch tokens (``token_attention``)."""

    tokens: Tensor  # (B, n, C) the patch tokens the backbone returns: that layer's output
    cls: Tensor | None  # (B, C) the class token after the same layer; None for a tower without one (SigLIP)
    importance: Tensor  # (B, n) float32: each patch token's softmax attention in that layer, mean over heads,
    # from the class token, or for a tower without one the mean over every query (prefix tokens included)
    keys: Tensor  # (B, n, head_dim) float32: that layer's keys of the patch tokens, mean over heads


def _layer_attention(q: Tensor, k: Tensor, scale: float, num_prefix: int) -> tuple[Tensor, Tensor]:
    """q (B, heads, R, hd) of the rating rows and k (B, heads, T, hd) of every token of one attention layer,
    as its softmax uses them -> (importance (B, n), keys (B, n, hd)) of the n = T - num_prefix patch tokens:
    the rows' attention, mean over heads and rows; the keys, mean over heads."""
    q, k = q.float(), k.float()
    probs = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return probs.mean((1, 2))[:, num_prefix:], k.mean(1)[:, num_prefix:]


def _query_key(x: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> tuple[Tensor, Tensor]:
    """The q of ``rows`` and the k of ``x`` (B, T, C) by a fused q / k / v projection (``weight`` (3 D, C), q
    first) -> (B, heads, R, hd), (B, heads, T, hd)."""
    (wq, wk, _), (bq, bk, _) = weight.chunk(3), ((None,) * 3 if bias is None else bias.chunk(3))
    q, k = F.linear(rows, wq, bq), F.linear(x, wk, bk)
    return q.unflatten(-1, (heads, -1)).transpose(1, 2), k.unflatten(-1, (heads, -1)).transpose(1, 2)


def _read_checkpoint(module: nn.Module, path: str | Path) -> dict[str, Tensor]:
    """The tower's weight file, refused for a tower built on the meta device, which cannot hold them."""
    if any(p.is_meta for p in module.parameters()):
        raise ValueError(f"checkpoint_path {path}: a tower built on the meta device (--empty_init) reads no weights; "
                         f"give them through the model's `pretrained` weights, or build without empty_init")
    return read_state_dict(path)


class VisionBackbone(nn.Module):
    """Base class: images (B, 3, H, W) -> patch tokens (B, H/p * W/p, embed_dim), row-major.

    Subclasses set `image_size`, `patch_size`, `embed_dim`, `mean`, `std`, implement
    `_patch_tokens`, and call `freeze()` at the end of `__init__` when asked to be frozen; those with
    attention also `has_class_token`, `_token_attention` and `attention_refusal`.
    """

    image_size: int  # native input size
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_class_token: bool = False  # a class token runs through the blocks with the patches (CLIP's; not SigLIP's)

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def freeze(self) -> VisionBackbone:
        """No gradients, and eval mode for good (dropout, etc.), whatever `.train()` says later."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> VisionBackbone:
        return super().train(mode and not self.frozen)

    def forward(self, images: Tensor) -> Tensor:
        self._check_size(images)
        return self._patch_tokens(images)

    def token_attention(self, images: Tensor) -> TokenAttention:
        """The patch tokens ``forward`` returns, with what the attention of the layer that outputs them
        computed: each token's importance and keys (``TokenAttention``). Refused (TypeError) by a tower
        ``attention_refusal`` names."""
        self._check_size(images)
        refusal = self.attention_refusal()
        if refusal is not None:
            raise TypeError(refusal)
        return self._token_attention(images)

    def attention_refusal(self) -> str | None:
        """Why ``token_attention`` cannot read this tower; None where it can."""
        return (f"{type(self).__name__} has no attention layer (no token attends to another); use a ViT tower: "
                f"TimmBackbone (a timm ViT, e.g. experiments/regions/vit_tower.yaml) or OpenClipBackbone")

    def _check_size(self, images: Tensor) -> None:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")

    def _patch_tokens(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _token_attention(self, images: Tensor) -> TokenAttention:
        raise NotImplementedError


def _square(size: int | tuple[int, int], what: str) -> int:
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"only square {what} are supported, got {height}x{width}")
    return height


class TimmBackbone(VisionBackbone):
    """A timm ViT (anything with `forward_intermediates`), e.g. CLIP or SigLIP towers.

    `checkpoint_path` holds a state dict of the timm model itself (timm key names). Blocks after
    `layer`, the final norm and the head are dropped after loading: they never reach the output.
    `final_norm`: keep the model's final norm and return the last block's tokens after it (e.g.
    transformers' SigLIP `last_hidden_state`, after `post_layernorm`); only with `layer` the last
    block. `depth` is the number of blocks of the whole model, before the drop.
    """

    def __init__(
        self,
        model_name: str,
        layer: int = -2,
        frozen: bool = False,
        checkpoint_path: str | Path | None = None,
        model_kwargs: dict | None = None,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        kwargs = {**(model_kwargs or {}), "num_classes": 0, "dynamic_img_size": True}
        self.model = timm.create_model(model_name, pretrained=False, **kwargs)
        if checkpoint_path is not None:
            load_state_dict_strict(self.model, _read_checkpoint(self.model, checkpoint_path), str(checkpoint_path))
        self.depth = len(self.model.blocks)
        self.block_index = _block_index(layer, self.depth)
        self.final_norm = final_norm
        if final_norm and self.block_index != self.depth - 1:
            raise ValueError(f"final_norm=True follows the last block: layer {layer} is block {self.block_index} of "
                             f"{self.depth}; give layer -1 (or {self.depth - 1}), or final_norm=False")
        if final_norm and isinstance(getattr(self.model, "norm", None), (nn.Identity, type(None))):
            raise ValueError(f"final_norm=True: {model_name} has no final norm before its pooling (`norm`)")
        self.model.prune_intermediate_layers([self.block_index], prune_norm=not final_norm, prune_head=True)

        self.image_size = _square(self.model.patch_embed.img_size, "images")
        self.patch_size = _square(self.model.patch_embed.patch_size, "patches")
        self.embed_dim = self.model.embed_dim
        self.mean = tuple(self.model.pretrained_cfg["mean"])
        self.std = tuple(self.model.pretrained_cfg["std"])
        self.has_class_token = bool(getattr(self.model, "has_class_token", False))
        if frozen:
            self.freeze()

    def _intermediates(self, images: Tensor, prefix: bool) -> list:
        # norm=True applies the final norm to the intermediates, here the last block's output alone
        norm = {"norm": True} if self.final_norm else {}
        return self.model.forward_intermediates(images, indices=[self.block_index], return_prefix_tokens=prefix,
                                                intermediates_only=True, output_fmt="NLC", stop_early=True, **norm)

    def _patch_tokens(self, images: Tensor) -> Tensor:
        (tokens,) = self._intermediates(images, prefix=False)
        return tokens

    def attention_refusal(self) -> str | None:
        block = self.model.blocks[self.block_index]
        if type(block) is not TimmBlock or type(block.attn) is not TimmAttention:
            return (f"block {self.block_index} of {type(self.model).__name__} is a {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__} attention; flexvlm reads the attention of timm's "
                    f"plain ViT block (timm.models.vision_transformer.Block, timm.layers.Attention) only")
        return None

    def _token_attention(self, images: Tensor) -> TokenAttention:
        """The block's own attention, recomputed from its q / k projections on its input (caught by a
        forward pre-hook: timm's fused attention returns no map)."""
        block = self.model.blocks[self.block_index]
        block_inputs: list[Tensor] = []
        hook = block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0]))
        try:
            (out,) = self._intermediates(images, prefix=True)
        finally:
            hook.remove()
        attn, num_prefix = block.attn, self.model.num_prefix_tokens
        tokens, prefix = out if num_prefix else (out, None)
        with torch.no_grad():
            x = block.norm1(block_inputs[0])
            rows = x[:, :1] if self.has_class_token else x  # the class token rates; without one, every token
            q, k = _query_key(x, rows, attn.qkv.weight, attn.qkv.bias, attn.num_heads)
            importance, keys = _layer_attention(attn.q_norm(q), attn.k_norm(k), attn.scale, num_prefix)
        cls = prefix[:, 0] if self.has_class_token else None
        return TokenAttention(tokens, cls, importance, keys)


class TimmFeatureMapBackbone(VisionBackbone):
    """A timm convolutional network (ConvNeXt, ResNet, ...) whose feature map at one stage is the
    token grid: a position of the (H/r, W/r) map is a token, r the stage's reduction, which plays
    the patch size. No position embeddings: padding and the receptive field place a token.

    `stage` indexes the network's `feature_info` (negative counts from the end); `image_size` is
    the input size the low-res image and every high-res crop are resized to. `checkpoint_path`
    holds a state dict of the timm model itself; the stages after `stage` and the head are dropped.
    """

    def __init__(
        self,
        model_name: str,
        stage: int = 1,
        image_size: int = 224,
        frozen: bool = False,
        checkpoint_path: str | Path | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_kwargs or {}))
        if checkpoint_path is not None:
            load_state_dict_strict(self.model, _read_checkpoint(self.model, checkpoint_path), str(checkpoint_path))
        self.stage = _block_index(stage, len(self.model.feature_info), "stage", "stages")
        self.model.prune_intermediate_layers([self.stage], prune_norm=True, prune_head=True)
        info = self.model.feature_info[self.stage]
        if image_size % info["reduction"]:
            raise ValueError(f"image_size {image_size} is not a multiple of stage {stage}'s reduction {info['reduction']}")
        self.image_size, self.patch_size, self.embed_dim = image_size, info["reduction"], info["num_chs"]
        self.mean = tuple(self.model.pretrained_cfg["mean"])
        self.std = tuple(self.model.pretrained_cfg["std"])
        if frozen:
            self.freeze()

    def _patch_tokens(self, images: Tensor) -> Tensor:
        (feature_map,) = self.model.forward_intermediates(
            images, indices=[self.stage], intermediates_only=True, output_fmt="NCHW", stop_early=True
        )
        return feature_map.flatten(2).transpose(1, 2)


class _DropRandomInitRecord(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _open_clip_random_init_unlogged() -> Iterator[None]:
    """open_clip logs "No pretrained weights loaded ... initialized randomly" for every model built
    with ``pretrained=None``, which is how flexvlm builds a tower whose weights it then loads itself
    (``checkpoint_path``, a LLaVA checkpoint): that one record is dropped while the model is built."""
    record_filter, root = _DropRandomInitRecord(), logging.getLogger()
    root.addFilter(record_filter)
    try:
        yield
    finally:
        root.removeFilter(record_filter)


class OpenClipBackbone(VisionBackbone):
    """The vision tower of an open_clip model (e.g. "ViT-L-14-336", LLaVA-1.5's tower).

    `checkpoint_path` holds a full open_clip / OpenAI CLIP state dict (the `visual.*` keys are
    used) or the vision tower's alone. Mean and std are OpenAI CLIP's.
    """

    def __init__(
        self,
        model_name: str,
        layer: int = -2,
        frozen: bool = False,
        checkpoint_path: str | Path | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        # pretrained_text=False: the text tower is dropped, never fetch weights for it; built on the
        # default device (the meta device under `with torch.device("meta")`), where open_clip moves it
        # unless told otherwise
        kwargs = {"device": torch.get_default_device(), **(model_kwargs or {})}
        with _open_clip_random_init_unlogged():
            model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False, **kwargs)
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"{model_name} has a {type(visual).__name__} vision tower; use TimmBackbone for it")
        if checkpoint_path is not None:
            state_dict = _read_checkpoint(visual, checkpoint_path)
            if any(k.startswith("visual.") for k in state_dict):
                state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
            load_state_dict_strict(visual, state_dict, str(checkpoint_path))
        self.block_index = _block_index(layer, len(visual.transformer.resblocks))
        visual.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
        self.visual = visual

        self.image_size = _square(visual.image_size, "images")
        self.patch_size = _square(visual.patch_size, "patches")
        self.embed_dim = visual.transformer.width
        self.mean = OPENAI_DATASET_MEAN
        self.std = OPENAI_DATASET_STD
        self.has_class_token = True
        if frozen:
            self.freeze()

    def _blocks_input(self, images: Tensor) -> Tensor:
        """(B, 1 + h*w, C): the class token and the patch tokens as the first block takes them."""
        # open_clip's own forward cannot resample position embeddings, hence the steps spelled out;
        # patch dropout is skipped on purpose: the selection needs every token of the grid.
        visual = self.visual
        x = visual.conv1(images)  # (B, C, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = _resample_pos_embed(visual.positional_embedding[None], self.grid_size, grid, num_prefix=1)
        return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def _patch_tokens(self, images: Tensor) -> Tensor:
        x = self._blocks_input(images)
        for block in self.visual.transformer.resblocks:  # already cut after the chosen layer
            x = block(x)
        return x[:, 1:]

    def attention_refusal(self) -> str | None:
        block = self.visual.transformer.resblocks[-1]
        if type(block) is not ResidualAttentionBlock or not block.attn._qkv_same_embed_dim:
            return (f"block {self.block_index} is a {type(block).__name__}; flexvlm reads the attention of "
                    f"open_clip's plain ResidualAttentionBlock (one in_proj of nn.MultiheadAttention) only")
        return None

    def _token_attention(self, images: Tensor) -> TokenAttention:
        """The last block's own attention, recomputed from its q / k projections on its input
        (nn.MultiheadAttention's fused path returns no map)."""
        *before, last = self.visual.transformer.resblocks
        x = self._blocks_input(images)
        for block in before:
            x = block(x)
        attn = last.attn
        with torch.no_grad():
            h = last.ln_1(x)  # the class token rates
            q, k = _query_key(h, h[:, :1], attn.in_proj_weight, attn.in_proj_bias, attn.num_heads)
            importance, keys = _layer_attention(q, k, attn.head_dim**-0.5, num_prefix=1)
        x = last(x)
        return TokenAttention(x[:, 1:], x[:, 0], importance, keys)


class _ResidualMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class PatchMLPBackbone(VisionBackbone):
    """Tiny per-patch encoder for the synthetic task: patch embedding, residual MLPs, final norm."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        depth: int = 2,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        frozen: bool = False,
        checkpoint_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.embed_dim = image_size, patch_size, embed_dim
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, self.grid_size**2, embed_dim))
        self.reset_parameters()  # drawn between the layers, where a seed has always drawn it
        self.blocks = nn.Sequential(*(_ResidualMLP(embed_dim, hidden_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)
        if checkpoint_path is not None:
            load_state_dict_strict(self, _read_checkpoint(self, checkpoint_path), str(checkpoint_path))
        if frozen:
            self.freeze()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The position embeddings, this module's own tensor (its layers reset theirs), e.g. once a
        model built on the meta device has memory."""
        nn.init.normal_(self.pos_embed, std=0.02)

    def _patch_tokens(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + _resample_pos_embed(self.pos_embed, self.grid_size, grid, num_prefix=0).to(x.dtype)
        return self.norm(self.blocks(x))
