"""The VLM: dual-path vision encoder + projector + decoder (any family), in one of four modes.

| mode      | what reaches the decoder                                               | paper name      |
|-----------|------------------------------------------------------------------------|-----------------|
| `lr_only` | the low-res tokens in the sequence                                     | LLaVA-1.5       |
| `hd`      | all high-res tokens in the sequence, as ordinary tokens                | LLaVA-HD        |
| `xattn`   | low-res tokens in the sequence; layers >= N_SA attend to ALL HR tokens | LLaVA-XAttn     |
| `flex`    | low-res tokens in the sequence; layers >= N_SA attend to selected HR   | LLaVA-FlexAttn  |

What the low-res and high-res tokens are is the encoder's (``VisualEncoder``): LLaVA-1.5's g x g
image and G x G grid of crops (``DualPathEncoder``), or an architecture's views and tiles, whose
geometry a ``VisualLayout`` describes; in ``hd`` the sequence holds what the original model puts there.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm import sharding
from flexvlm.attention import AttentionBackend, build_backend
from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.decoder import AttentionInputs, KVCache, LanguageModel, PromptPositions
from flexvlm.models.encoder import DualPathEncoder, EncodedImages, VisualEncoder
from flexvlm.models.families import preset
from flexvlm.models.generation import generate
from flexvlm.models.flex_attention import (
    FLEX_IMPLS, FlexAttention, HighResInputs, HighResKVCache, HighResSelector, MapRequest, Selection, SelectingRows,
    SelectionRecord, cross_attention_layer, flex_layer, low_res_map, mapped_layer,
)
from flexvlm.models.geometry import VisualLayout, high_res_rope
from flexvlm.models.projector import build_projector
from flexvlm.models.pruning import SequencePruning
from flexvlm.models.vision import VisionBackbone
from flexvlm.reduction import ImageTokenReduction, TokenReduction, build_reduction
from flexvlm.selection import SelectionStrategy, build_selection

MODES = ("lr_only", "hd", "xattn", "flex")


@dataclass
class MultimodalInputs:
    """A batch after the image tokens were spliced into the text sequence."""

    embeds: Tensor  # (B, N, D)
    attention_mask: Tensor  # (B, N) long
    labels: Tensor | None  # (B, N) with IGNORE_INDEX outside the answers
    image_start: Tensor  # (B,) position of the first image token
    lr_features: Tensor | None  # (B, g*g, C) vision tokens before the projector (where the encoder gives them)
    hr_features: Tensor | None  # (B, G*G, C)
    image_mask: Tensor  # (B, N) bool: the image tokens in the sequence
    high_res: HighResInputs | None = None  # xattn and flex
    pruning: SequencePruning | None = None  # hd mode with a token reduction in the decoder
    reduced: KeptImageTokens | None = None  # hd mode with a reduction before the decoder
    positions: PromptPositions | None = None  # the architecture's position ids (multimodal RoPE); None: counted

    @property
    def budget(self) -> SequencePruning | KeptImageTokens | None:
        """The token reduction that spends a share of the high-res tokens, if any (its ``row_fraction``);
        flex mode's share is in the ``SelectionRecord`` each decoder pass returns."""
        return next((b for b in (self.pruning, self.reduced) if b is not None), None)


@dataclass
class KeptImageTokens:
    """hd's image tokens after a reduction before the decoder (``ImageTokenReduction``, e.g. VisionZip):
    every layer sees the same of them."""

    fraction: Tensor  # (B,) the share of the sample's high-res tokens in the sequence

    def image_fraction(self) -> Tensor:
        """(B,) the share of the image tokens a layer sees, mean over the layers (``SequencePruning``'s)."""
        return self.fraction

    def row_fraction(self) -> Tensor:
        """(B, 1): every row alike (``SelectionRecord.row_fraction``)."""
        return self.fraction[:, None]


@dataclass
class VLMOutput:
    logits: Tensor
    loss: Tensor | None
    lr_features: Tensor | None
    hr_features: Tensor | None
    selected_fraction: dict[int, Tensor] = field(default_factory=dict)  # FA layer -> fraction of HR tokens
    selection_masks: dict[int, Tensor] = field(default_factory=dict)  # FA layer -> (B, R, H, W)
    selection_maps: dict[int, Tensor] = field(default_factory=dict)  # FA layer -> (B, R, h, w), SelectionRecord.maps
    # (lr_only with map_grad: the layer a flex model would select for, see FlexVLM.decode_with_maps)
    sample_fraction: Tensor | None = None  # (B,) HR fraction used per sample, mean over FA layers
    # (with a token reduction: the share of the image tokens a layer sees, mean over layers)
    row_fraction: Tensor | None = None  # (B, R) HR fraction used per selecting row, mean over FA layers


@dataclass
class StepOutput:
    """One cached decoding step (``FlexVLM.step``)."""

    logits: Tensor  # (B, 1, vocab) of the last row
    selection: SelectionRecord | None  # flex mode: what the last row selected in each FA layer


class WeightLoader(ABC):
    """Local weights a FlexVLM starts from (``FlexVLM(pretrained=...)``), loaded once it has tensors:
    an architecture's checkpoint reader implements it (``flexvlm.architectures``)."""

    @abstractmethod
    def apply(self, model: FlexVLM) -> None:
        """Load the weights into ``model``, strictly."""


class FlexVLM(nn.Module):
    """Assembled from swappable parts; every part is a constructor argument, so a YAML names it."""

    def __init__(
        self,
        backbone: VisionBackbone | None = None,
        llm: str | LanguageModel = "tiny",
        llm_overrides: dict | None = None,
        mode: str = "flex",
        num_sa_layers: int | None = None,
        selection: SelectionStrategy | str | None = None,
        projector: str | nn.Module = "mlp2x_gelu",
        zoom: int = 3,
        high_res_path: str = "crops",
        high_res_grad: bool = False,
        gradient_checkpointing: bool = False,
        pretrained: WeightLoader | None = None,
        flex_impl: str = "fused",
        margin_rule: str = "centre",
        encoder: VisualEncoder | None = None,
        reduction: TokenReduction | ImageTokenReduction | str | None = None,
        attn_backend: str | AttentionBackend = "sdpa",
    ) -> None:
        """``backbone``: the vision tower of LLaVA-1.5's geometry, which ``zoom``, ``high_res_path``,
        ``high_res_grad`` and ``margin_rule`` complete (``DualPathEncoder``); or, instead of all of them,
        ``encoder``: an architecture's ``VisualEncoder`` (``flexvlm.architectures``).
        ``llm``: the decoder, any family's ``LanguageModel`` (in a YAML by ``class_path`` and
        ``init_args``, as the backbone), or the name of a preset (``flexvlm.models.families``), whose
        fields ``llm_overrides`` changes. ``projector``: a module from the tower's features to the
        decoder's width, or the name of one (``flexvlm.models.projector.build_projector``, LLaVA's layouts).
        ``num_sa_layers`` (N_SA) plain layers come first; the remaining N_FA are FlexAttention layers
        (default: the release's 9 of 32, scaled; 0 for ``xattn``, where every layer cross-attends);
        ``flex`` and ``xattn`` need at least one layer after them.
        ``selection`` (``flex`` only; default ``attention``, the release's threshold rule): the other
        modes select nothing, so a strategy given to them is refused rather than recorded unused.
        ``gradient_checkpointing`` recomputes decoder layers in the backward pass to save memory.
        ``pretrained`` names local weights, loaded once the model is built (W_K', W_V' that they lack
        start as the loaded W_K, W_V); a model built on the meta device loads them in ``load_weights``,
        once its tensors are materialised.
        ``flex_impl``: ``fused`` (only the selecting rows and their selected tokens cost extra) or
        ``release`` (every row scores every HR key through a mask, as the authors' training; the same
        result, kept as a baseline for the benchmarks). ``margin_rule``: which low-res cells of a
        padded image count as border, out of the selecting maps (``flexvlm.selection.valid_grid``:
        ``centre``, or the authors' ``release``, which the released checkpoint's path uses).
        ``reduction`` (``hd`` only): a peer method that drops image tokens from the sequence between
        decoder layers (``flexvlm.reduction``: ``fastv``, ``pyramid_drop``), or reduces them before the
        decoder (``visionzip``). ``attn_backend``: the fused attention kernel of every decoder layer
        (``flexvlm.attention``: ``sdpa``, ``eager``, the reference, or ``flex``, torch's flex_attention)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
        if flex_impl not in FLEX_IMPLS:
            raise ValueError(f"unknown flex_impl {flex_impl!r}; valid: {list(FLEX_IMPLS)}")
        self.mode, self.flex_impl, self.margin_rule = mode, flex_impl, margin_rule
        if isinstance(llm, str):
            family, self.config = preset(llm, **(llm_overrides or {}))
        elif llm_overrides:
            raise ValueError("llm_overrides changes a preset's fields; a decoder object has its own config")
        else:
            family, self.config = None, llm.config
        self.encoder = _encoder(backbone, encoder, zoom=zoom, high_res_path=high_res_path, high_res_grad=high_res_grad,
                                margin_rule=margin_rule)
        self.projector = (projector if isinstance(projector, nn.Module)
                          else build_projector(projector, self.encoder.feature_dim, self.config.hidden_size))
        # a preset's decoder is built after the projector, so that a seed keeps giving the same weights
        self.llm = llm if family is None else family(self.config)
        self.llm.gradient_checkpointing = gradient_checkpointing
        self.attn_backend = build_backend(attn_backend)
        for layer in self.llm.layers:
            layer.self_attn.backend = self.attn_backend
        num_layers = self.config.num_layers
        if num_sa_layers is None:
            num_sa_layers = 0 if mode == "xattn" else max(1, round(num_layers * 9 / 32))
        min_sa = 1 if mode == "flex" else 0  # flex needs one plain layer whose map seeds the selection
        # ... and flex and xattn a layer after the plain ones that attends to high-res tokens
        max_sa = num_layers - 1 if mode in ("flex", "xattn") else num_layers
        if not min_sa <= num_sa_layers <= max_sa:
            raise ValueError(f"num_sa_layers must be in [{min_sa}, {max_sa}] for mode {mode!r} with {num_layers} decoder "
                             f"layers, got {num_sa_layers}" + (": no layer would attend to high-res tokens"
                                                               if num_sa_layers == num_layers else ""))
        self.num_sa_layers = num_sa_layers
        if mode != "flex" and selection is not None:
            raise ValueError(f"mode {mode!r} selects no high-res tokens, but a selection strategy is given ({selection!r}): "
                             "it would be recorded in the run's config unused. Set model.model.init_args.selection "
                             "to null, or use mode flex")
        self.selection = build_selection(selection or "attention") if mode == "flex" else None
        if flex_impl == "release" and self.selection is not None and self.selection.weighs_keys:
            raise ValueError(f"{self.selection!r} weighs the high-res keys (a soft selection), which only flex_impl "
                             "'fused' applies; the release's layer is binary")
        if reduction is not None and getattr(self.config, "mrope_section", None) is not None:
            raise ValueError(f"a token reduction ({reduction!r}) recounts the decoder's positions, which multimodal "
                             "RoPE (mrope_section) takes from the architecture: not implemented")
        if reduction is not None and mode != "hd":
            raise ValueError(f"a token reduction ({reduction!r}) drops image tokens of the sequence, which only mode hd "
                             f"holds; mode {mode!r} has none to drop")
        self.reduction = build_reduction(reduction) if reduction is not None else None
        if isinstance(self.reduction, TokenReduction):
            self.reduction.check(num_layers)
        elif self.reduction is not None:  # refused here where the encoder's tower cannot give what it reads
            self.encoder.reduced_tokens(self.reduction)
        if self.uses_high_res_attention:
            for layer in self.llm.layers[num_sa_layers:]:
                layer.self_attn = FlexAttention(layer.self_attn)
        self.pretrained = pretrained
        if pretrained is not None and not self.is_meta:
            pretrained.apply(self)

    @property
    def is_meta(self) -> bool:
        """Whether any tensor is still on the meta device (built under ``torch.device("meta")``)."""
        return any(t.is_meta for t in [*self.parameters(), *self.buffers()])

    def materialize(self, device: torch.device | str) -> None:
        """Gives a model built on the meta device its tensors on ``device``: memory (``to_empty``), each
        module's ``reset_parameters``, then ``load_weights``. A module with tensors of its own but no
        ``reset_parameters`` (e.g. a timm or open_clip tower's position embeddings) is an error unless
        ``pretrained`` weights are loaded over it."""
        owners = [(name, m) for name, m in self.named_modules()
                  if [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
        missing = [name for name, m in owners if not hasattr(m, "reset_parameters")]
        if missing and self.pretrained is None:
            raise TypeError(f"cannot initialise {', '.join(missing[:5])} after a build on the meta device (no "
                            f"reset_parameters): load pretrained weights over them, or build on a real device")
        self.to_empty(device=device)
        with torch.no_grad():
            for _, module in owners:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.load_weights()

    def fully_shard(self, mesh: Any) -> None:
        """Shard the weights over ``mesh`` (a 1-D ``DeviceMesh``) with FSDP2, as Lightning's
        ``ModelParallelStrategy`` expects ``configure_model`` to: each decoder layer is a unit,
        gathered for its own forward; the rest (tower, projector, embeddings, head) is the root unit,
        gathered for ``forward`` and ``generate``. Called on a model built on the meta device, before
        ``materialize``, a process never holds more than its shard of the weights."""
        for layer in self.llm.layers:
            sharding.fully_shard(layer, mesh)
        sharding.fully_shard(self, mesh)
        sharding.register_forward_method(self, "generate")

    @property
    def is_sharded(self) -> bool:
        """Whether ``fully_shard`` has sharded the weights."""
        return sharding.is_fully_sharded(self)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``flexvlm.models.generation.generate`` on this model (its arguments after the model): the entry
        point through which a sharded model gathers its root unit for generation (``fully_shard``)."""
        return generate(self, *args, **kwargs)

    def load_weights(self) -> None:
        """What construction on a real device gives, for a model built on the meta device once its
        tensors are real (``to_empty`` and each module's ``reset_parameters``, as Lightning's FSDP
        strategy materialises it): tied embeddings tied again, then the ``pretrained`` weights (W_K',
        W_V' that they lack start as their W_K, W_V), or without them W_K', W_V' as copies of W_K, W_V."""
        self.llm.tie_weights()
        if self.pretrained is not None:
            self.pretrained.apply(self)
            return
        for i in self.flex_layers:
            self.llm.layers[i].self_attn.init_high_res_projections()

    @property
    def uses_high_res_attention(self) -> bool:
        return self.mode in ("xattn", "flex")

    @property
    def spends_high_res_budget(self) -> bool:
        """Whether the model uses a share of the high-res tokens (``hr_fraction``): flex mode's selection,
        or a token reduction of hd mode's sequence."""
        return self.mode == "flex" or self.reduction is not None

    @property
    def placeholder_tokens(self) -> int:
        """Sequence positions one image placeholder of a prompt stands for (the encoder's; after a reduction
        before the decoder, those it leaves)."""
        if isinstance(self.reduction, ImageTokenReduction):
            return self.encoder.reduced_tokens(self.reduction)
        return self.encoder.placeholder_tokens(self.mode)

    @property
    def flex_layers(self) -> list[int]:
        return list(range(self.num_sa_layers, self.config.num_layers)) if self.uses_high_res_attention else []

    @property
    def image_size(self) -> int | None:
        """The side of the square images the model takes; None when its architecture's preprocessing
        sizes them."""
        return self.encoder.input_size

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Any,
        content_box: Tensor | None = None,
        labels: Tensor | None = None,
        alpha: float = 1.0,
        high_res_kv: str = "lazy",
        map_grad: bool = False,
    ) -> MultimodalInputs:
        """Encode the images (a tensor, or the architecture's image batch) and splice their tokens in
        place of each row's image placeholders. ``high_res_kv`` (``lazy`` / ``prefill``): how a
        generation projects HR K/V; ``map_grad``: the selecting maps keep their gradient (see
        ``MapRequest``)."""
        if isinstance(self.reduction, ImageTokenReduction):
            encoded = self.encoder.encode_reduced(images, self.projector, self.reduction)
        else:
            encoded = self.encoder.encode(images, self.projector, self.mode, content_box)
        embeds, mask, labels, image_start, image_mask = self._splice(input_ids, attention_mask, labels, encoded)
        inputs = MultimodalInputs(embeds, mask, labels, image_start, encoded.lr_features, encoded.hr_features,
                                  image_mask)
        inputs.positions = self.encoder.prompt_positions(images, self.mode, image_mask, mask)
        if inputs.positions is not None and getattr(self.config, "mrope_section", None) is None:
            raise ValueError(f"{type(self.encoder).__name__} places image tokens by multimodal RoPE, which the "
                             f"decoder ({type(self.llm).__name__}, no mrope_section) does not have")
        if isinstance(self.reduction, TokenReduction):
            inputs.pruning = SequencePruning.create(self.reduction, image_mask, self.config.num_layers)
        elif self.reduction is not None:
            inputs.reduced = KeptImageTokens(encoded.kept_fraction)
        if self.uses_high_res_attention:
            inputs.high_res = self._high_res_inputs(inputs, encoded.high_res, encoded.layout, alpha, high_res_kv,
                                                    map_grad)
        return inputs

    def _splice(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None, encoded: EncodedImages
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """The image tokens in place of the placeholders: one placeholder per image token (an
        architecture's processor expanded them), or one per row that its image's tokens replace
        (LLaVA-1.5's prompt). -> (embeds, attention mask, labels, position of each row's first image
        token, (B, N) where the image tokens are)."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        found = is_image.sum(-1)
        tokens = encoded.in_sequence
        n_img = tokens.shape[1]
        counts = encoded.counts if encoded.counts is not None else found.new_full(found.shape, n_img)
        image_start = is_image.long().argmax(-1)
        text_embeds = self.llm.embed(input_ids.masked_fill(is_image, 0))
        if bool((found == counts).all()):
            real = torch.arange(n_img, device=tokens.device) < counts[:, None]
            embeds = text_embeds.masked_scatter(is_image[..., None], tokens[real].to(text_embeds.dtype))
            return embeds, attention_mask, labels, image_start, is_image
        if not bool((found == 1).all()) or encoded.counts is not None:
            raise ValueError(f"every row needs exactly one image placeholder ({IMAGE_TOKEN_INDEX}), or one per image token "
                             f"({counts.tolist()}); found per row: {found.tolist()}")
        b, t = input_ids.shape
        # text token j goes to j (before the image) or j + n_img - 1 (after it)
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        target = positions + (positions > image_start[:, None]) * (n_img - 1)
        n = t - 1 + n_img
        keep = ~is_image
        bi = torch.arange(b, device=input_ids.device)[:, None].expand(b, t)[keep]
        ti = target[keep]
        image_pos = image_start[:, None] + torch.arange(n_img, device=input_ids.device)
        bi_img = torch.arange(b, device=input_ids.device)[:, None].expand(b, n_img)

        embeds = text_embeds.new_zeros(b, n, text_embeds.shape[-1])
        embeds = embeds.index_put((bi, ti), text_embeds[keep]).index_put((bi_img, image_pos), tokens.to(embeds.dtype))
        mask = attention_mask.new_ones(b, n).index_put((bi, ti), attention_mask[keep])
        if labels is not None:
            labels = labels.new_full((b, n), IGNORE_INDEX).index_put((bi, ti), labels[keep])
        image_mask = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
        image_mask[bi_img, image_pos] = True
        return embeds, mask, labels, image_start, image_mask

    def _lr_index(self, image_start: Tensor, lr_shape: tuple[int, int]) -> Tensor:
        """(B, h*w) sequence positions of the low-res grid's tokens."""
        h, w = lr_shape
        return image_start[:, None] + torch.arange(h * w, device=image_start.device)

    def _high_res_inputs(
        self, inputs: MultimodalInputs, hr_tokens: Tensor, layout: VisualLayout, alpha: float, kv_mode: str,
        map_grad: bool,
    ) -> HighResInputs:
        b, n = inputs.attention_mask.shape
        lr_index = self._lr_index(inputs.image_start, layout.lr_shape)
        if inputs.positions is not None:  # the architecture's positions: its encoder places the high-res keys too
            hr_positions = self.encoder.high_res_positions(inputs.positions.prompt, lr_index, layout)
            hr_cos, hr_sin = self.llm.rope(hr_positions, hr_tokens.dtype)
        else:
            positions = self.llm.position_ids(inputs.attention_mask, b, n, 0, hr_tokens.device)
            cos, sin = self.llm.rope(positions.gather(1, lr_index), hr_tokens.dtype)
            hr_cos, hr_sin = high_res_rope(cos, sin, layout)
        kv = HighResKVCache(hr_tokens, hr_cos, hr_sin, layout.hr_valid.flatten(1), kv_mode)
        if self.selection is None:  # xattn: every row sees every HR token
            return HighResInputs(kv, alpha=alpha)
        selector = HighResSelector(self.selection, layout, every_token_keys=self.flex_impl == "release")
        return HighResInputs(kv, selector, MapRequest(inputs.image_start, layout.lr_shape, map_grad), alpha)

    # -- forward --------------------------------------------------------------------------------
    def decode(
        self, embeds: Tensor, attention_mask: Tensor, row_mask: Tensor, high_res: HighResInputs | None,
        cache: KVCache | None = None, pruning: SequencePruning | None = None,
        positions: PromptPositions | None = None,
    ) -> tuple[Tensor, SelectionRecord | None]:
        """The decoder loop: -> (hidden states after the final norm, in flex mode the record of what the
        rows in ``row_mask`` (B, N) selected, else None). In flex mode each layer from N_SA - 1 on
        returns its selecting rows' map, from which the loop selects the next layer's HR tokens. With a
        token reduction (``pruning``) the rows where answers start rate the image tokens, and the layers
        after each stage see those it kept. ``attention_mask`` covers cached keys too. ``positions``: the
        prompt's position ids where the architecture gives them (``MultimodalInputs.positions``)."""
        llm = self.llm
        if pruning is not None and not (cache is not None and len(cache)):
            return pruning.run_prompt(llm, embeds, attention_mask, row_mask, cache), None
        inputs = llm.attention_inputs(embeds, attention_mask, cache,
                                      self._position_ids(positions, embeds, attention_mask, cache))
        x = embeds
        if pruning is not None:  # a decoding step: each layer's cache holds its stage's tokens
            for layer, layer_inputs in zip(llm.layers, pruning.step_inputs(llm, inputs, attention_mask, embeds.dtype)):
                x = layer(x, layer_inputs, cache)
            return llm.final_norm(x), None
        rows = None
        if high_res is not None:  # flex: the rows in row_mask select; cross-attention: every row attends
            rows = SelectingRows.from_mask(row_mask if high_res.selector is not None else torch.ones_like(row_mask),
                                           inputs)
        return self.decode_layers(x, inputs, cache, rows, high_res)

    def decode_layers(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows | None,
                      high_res: HighResInputs | None) -> tuple[Tensor, SelectionRecord | None]:
        """``decode``'s loop over the layers, on prepared inputs and ``rows`` (flex: the selecting rows;
        cross-attention: every row; None without HR attention) that the caller built: ``decode``, or a
        decoding step of static shapes (``flexvlm.models.static_decode``)."""
        llm = self.llm
        if high_res is not None and high_res.selector is not None:
            return self._selecting_layers(x, inputs, cache, rows, high_res)
        for i, layer in enumerate(llm.layers):
            if high_res is None or i < self.num_sa_layers:
                x = llm.checkpointed(layer, x, inputs, cache)
            else:  # cross-attention: every row attends to every HR token
                x = llm.checkpointed(layer, x, inputs, cache, cross_attention_layer, rows, high_res.kv)
        return llm.final_norm(x), None

    def _position_ids(self, positions: PromptPositions | None, embeds: Tensor, attention_mask: Tensor,
                      cache: KVCache | None) -> Tensor | None:
        """The position ids of a forward's tokens where the architecture gives them; None: the decoder counts."""
        if positions is None:
            return None
        return positions.of_chunk(self.llm, attention_mask, embeds.shape[1], len(cache) if cache is not None else 0)

    def _selecting_layers(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
                          high_res: HighResInputs) -> tuple[Tensor, SelectionRecord]:
        """flex mode's decoder loop: each layer from N_SA - 1 on takes the selection made from the map of
        the layer before (none for the first) and returns its own map. -> (hidden states after the final
        norm, the record of the selections)."""
        llm = self.llm
        record = SelectionRecord(rows, high_res.selector.available)
        selection: Selection | None = None
        for i, layer in enumerate(llm.layers):
            if i < self.num_sa_layers - 1:
                x = llm.checkpointed(layer, x, inputs, cache)
                continue
            map_request = high_res.map_request if i + 1 < len(llm.layers) else None  # the last selects for none
            x, attn_map = llm.checkpointed(layer, x, inputs, cache, flex_layer, rows, selection, high_res.kv,
                                           high_res.alpha, map_request, self.flex_impl)
            if attn_map is not None:
                # selected outside the checkpointed layer, so that a recomputed layer sees the same tokens
                selection, mask = high_res.selector.select(i + 1, attn_map, rows)
                record.add(i + 1, attn_map, mask)
        return llm.final_norm(x), record

    def decode_with_maps(self, inputs: MultimodalInputs, row_mask: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The decoder loop of a model without HR attention (``lr_only``), teacher-forced, that also
        returns where the rows in ``row_mask`` look: the low-res maps of the layers that would select
        in flex mode (N_SA - 1 to L - 2), keyed like ``SelectionRecord.maps`` by the layer they would
        select for, with their gradient. -> (hidden states after the final norm, maps)."""
        llm = self.llm
        attn_inputs = llm.attention_inputs(inputs.embeds, inputs.attention_mask, None,
                                           self._position_ids(inputs.positions, inputs.embeds, inputs.attention_mask,
                                                              None))
        rows = SelectingRows.from_mask(row_mask, attn_inputs)
        lr_index = self._lr_index(inputs.image_start, self.encoder.lr_shape)
        mapped = range(max(self.num_sa_layers - 1, 0), len(llm.layers) - 1)
        x, maps = inputs.embeds, {}
        for i, layer in enumerate(llm.layers):
            if i in mapped:
                x, probs = llm.checkpointed(layer, x, attn_inputs, None, mapped_layer, rows, True)  # map_grad
                maps[i + 1] = low_res_map(probs, lr_index, self.encoder.lr_shape)
            else:
                x = llm.checkpointed(layer, x, attn_inputs, None)
        return llm.final_norm(x), maps

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Any,
        content_box: Tensor | None = None,
        labels: Tensor | None = None,
        alpha: float = 1.0,
        select_last: int = 1,
        map_grad: bool = False,
    ) -> VLMOutput:
        """Teacher-forced pass. With ``labels`` the loss covers the answer tokens and every row that
        predicts one selects its own HR tokens; without, the last ``select_last`` rows select (what
        cached generation does: the last prompt row, then each generated token's row).
        ``map_grad``: ``selection_maps`` keep their gradient (a training objective on them); in
        ``lr_only`` mode they are the maps the rows would select with (``decode_with_maps``)."""
        inputs = self.prepare(input_ids, attention_mask, images, content_box, labels, alpha, map_grad=map_grad)
        if inputs.labels is not None:
            row_mask = F.pad(inputs.labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        else:
            row_mask = torch.zeros_like(inputs.attention_mask, dtype=torch.bool)
            row_mask[:, -select_last:] = True
        maps: dict[int, Tensor] = {}
        record = None
        if self.mode == "lr_only" and map_grad:
            hidden, maps = self.decode_with_maps(inputs, row_mask)
        else:
            hidden, record = self.decode(inputs.embeds, inputs.attention_mask, row_mask, inputs.high_res,
                                         pruning=inputs.pruning, positions=inputs.positions)
        logits = self.llm.logits(hidden)
        loss = None
        if inputs.labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), inputs.labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        out = VLMOutput(logits=logits, loss=loss, lr_features=inputs.lr_features, hr_features=inputs.hr_features,
                        selection_maps=maps)
        if self.reduction is not None:  # hd: the reduction's record is the budget
            out.sample_fraction, out.row_fraction = inputs.budget.image_fraction(), inputs.budget.row_fraction()
        if record is not None:
            out.selected_fraction, out.selection_masks = record.selected_fraction(), dict(record.masks)
            out.selection_maps, out.sample_fraction = dict(record.maps), record.sample_fraction()
            out.row_fraction = record.row_fraction()
        return out

    def step(self, embeds: Tensor, attention_mask: Tensor, cache: KVCache, high_res: HighResInputs | None,
             pruning: SequencePruning | None = None, positions: PromptPositions | None = None) -> StepOutput:
        """One cached decoding step (or a prefill): the last row of each sample selects (or rates the
        image tokens, at a reduction's prefill). ``positions``: the prompt's, where the architecture gives
        them (``MultimodalInputs.positions``)."""
        row_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        row_mask[:, -1] = True
        hidden, selection = self.decode(embeds, attention_mask, row_mask, high_res, cache, pruning, positions)
        return StepOutput(self.llm.logits(hidden[:, -1:]), selection)


def _encoder(backbone: VisionBackbone | None, encoder: VisualEncoder | None, **dual_path: Any) -> VisualEncoder:
    """The given encoder, or LLaVA-1.5's dual path around ``backbone``."""
    if (backbone is None) == (encoder is None):
        raise ValueError("give a vision backbone (LLaVA-1.5's geometry) or an architecture's encoder, exactly one")
    if encoder is None:
        return DualPathEncoder(backbone, **dual_path)
    defaults = inspect.signature(FlexVLM.__init__).parameters
    changed = [k for k, v in dual_path.items() if v != defaults[k].default]
    if changed:
        raise ValueError(f"{', '.join(changed)} belong to a backbone's dual path; {type(encoder).__name__} has its "
                         f"own geometry")
    return encoder
