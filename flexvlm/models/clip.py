"""CLIP vision towers from transformers' and open_clip's checkpoints: the rename tables between their
tensor names and those of ``OpenClipBackbone``, a tower shaped like a transformers
``CLIPVisionConfig``, and strict loading with the config checked (the activation, the feature
layer), since no tensor shape reveals a wrong one."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from flexvlm.models.vision import OpenClipBackbone, VisionBackbone
from flexvlm.weights import StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_config


_CLIP_HF_RENAMES = [  # (HF CLIPVisionTransformer pattern, open_clip VisionTransformer name)
    (r"embeddings\.class_embedding", "class_embedding"),
    (r"embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"pre_layrnorm\.", "ln_pre."),  # sic: HF's spelling
    (r"post_layernorm\.", "ln_post."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
]


_CLIP_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


# a CLIPModel folder holds the text tower too; position_ids is a buffer older versions saved
_CLIP_HF_IGNORED = ("text_model.", "text_projection.", "logit_scale", "embeddings.position_ids")


def _inverse_rename(pattern: str, new: str) -> tuple[str, str]:
    """A rename of `_CLIP_HF_RENAMES` the other way: its replacement as the pattern (a block number
    `\\1` matched by `(\\d+)`), its pattern as the replacement."""
    return re.escape(new).replace(r"\\1", r"(\d+)"), pattern.replace(r"(\d+)", r"\1").replace(r"\.", ".")


_CLIP_OPEN_CLIP_RENAMES = [_inverse_rename(pattern, new) for pattern, new in _CLIP_HF_RENAMES]
_CLIP_OPEN_CLIP_QKV = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def _renamed(name: str, renames: list[tuple[str, str]]) -> str:
    """`name` by the first rename whose pattern starts it; unchanged when none does."""
    for pattern, new in renames:
        name, found = re.subn(f"^{pattern}", new, name)
        if found:
            break
    return name


def clip_vision_from_hf(state: StateDict) -> StateDict:
    """HF CLIP vision weights (`CLIPVisionModel`, or the vision half of `CLIPModel`, with or without
    the `vision_model.` prefix) -> open_clip `VisionTransformer` names. Separate q/k/v projections
    become one `in_proj`, as `nn.MultiheadAttention` keeps them; unknown names pass through
    unchanged (and fail the strict load)."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in state.items():
        name = name.removeprefix("vision_model.")
        if name.startswith(_CLIP_HF_IGNORED):
            continue
        if name == "visual_projection.weight":
            out["proj"] = tensor.t()  # open_clip applies x @ proj, HF a Linear
        elif match := _CLIP_HF_QKV.fullmatch(name):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
        else:
            out[_renamed(name, _CLIP_HF_RENAMES)] = tensor
    for (layer, kind), tensors in qkv.items():
        if set(tensors) == {"q", "k", "v"}:
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([tensors[c] for c in "qkv"])
        else:  # incomplete: keep the HF names so the strict load reports them
            out.update({f"encoder.layers.{layer}.self_attn.{c}_proj.{kind}": t for c, t in tensors.items()})
    return out


def fused_qkv_to_hf(state: StateDict, fused_qkv: re.Pattern, renames: list[tuple[str, str]], prefix: str,
                    unbatched: tuple[str, ...] = ()) -> StateDict:
    """A ViT's tensors under another library's names (open_clip's, timm's) -> transformers' under `prefix`:
    each fused q / k / v tensor (`fused_qkv` matches its name, layer and kind) split into `q_proj`, `k_proj`,
    `v_proj` (copies: safetensors stores no tensors that share memory), the others renamed by `renames`;
    the tensors named in `unbatched` lose the leading batch dimension that transformers' lack."""
    out: StateDict = {}
    for name, tensor in state.items():
        if match := fused_qkv.fullmatch(name):
            layer, kind = match.groups()
            for which, part in zip("qkv", tensor.chunk(3)):
                out[f"{prefix}encoder.layers.{layer}.self_attn.{which}_proj.{kind}"] = part.clone()
        else:
            out[prefix + _renamed(name, renames)] = tensor[0] if name in unbatched else tensor
    return out


def clip_vision_to_hf(state: StateDict) -> StateDict:
    """The inverse of `clip_vision_from_hf` for a tower as OpenClipBackbone keeps it (no head): open_clip
    `VisionTransformer` names -> HF `CLIPVisionModel` names (`vision_model.*`)."""
    return fused_qkv_to_hf(state, _CLIP_OPEN_CLIP_QKV, _CLIP_OPEN_CLIP_RENAMES, "vision_model.")


def clip_vision_from_open_clip(state: StateDict) -> StateDict:
    """An open_clip / OpenAI CLIP state dict (whole model: its `visual.*` part) -> the vision tower's."""
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def is_hf_clip(state: StateDict) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in state)


def check_clip_config(visual: nn.Module, hf: dict, source: str) -> None:
    # HF CLIP (OpenAI's weights) uses quick_gelu; open_clip builds nn.GELU unless told otherwise
    quick = isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    act = hf.get("hidden_act", "quick_gelu")
    if (act == "quick_gelu") != quick:
        raise_mismatches(
            [f"hidden_act {act!r} vs model {'quick_gelu' if quick else 'gelu'}: build OpenClipBackbone with a "
             f"'-quickgelu' model name (or model_kwargs {{force_quick_gelu: true}}) exactly when the checkpoint "
             f"uses quick_gelu"],
            source, "vision tower",
        )


def feature_block(layer: int, depth: int) -> int:
    """HF `hidden_states[layer]` of a `depth`-block tower is the output of this block (index 0 is
    the embeddings)."""
    return layer % (depth + 1) - 1


_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _pruned(name: str, kept: int) -> bool:
    """Weights of what OpenClipBackbone drops after its layer (later blocks, final norm, head): they
    have no place to go."""
    block = _BLOCK.match(name)
    return name == "proj" or name.startswith("ln_post.") or (block is not None and int(block.group(1)) >= kept)


def load_vision_state(
    backbone: VisionBackbone, state: StateDict, source: str, hf_config: dict | None, feature_layer: int | None
) -> None:
    """An open_clip-named tower state dict into a (pruned) OpenClipBackbone."""
    if not isinstance(backbone, OpenClipBackbone):
        raise TypeError(f"CLIP weights load into an OpenClipBackbone, got {type(backbone).__name__}")
    visual = backbone.visual
    if hf_config is not None:
        check_clip_config(visual, hf_config, source)
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if feature_layer is not None and blocks and feature_block(feature_layer, len(blocks)) != backbone.block_index:
        raise_mismatches(
            [f"the LLaVA feature layer {feature_layer} of a {len(blocks)}-block tower is block "
             f"{feature_block(feature_layer, len(blocks))}, the backbone returns block {backbone.block_index}"],
            source, "vision backbone's layer",
        )
    state = {k: v for k, v in state.items() if not _pruned(k, len(visual.transformer.resblocks))}
    load_state_dict_strict(visual, state, source)


def load_clip_vision(backbone: VisionBackbone, path: str | Path, feature_layer: int | None = None) -> None:
    """CLIP vision weights into an OpenClipBackbone: a HF `CLIPVisionModel` / `CLIPModel` folder
    (renamed to open_clip's names) or an open_clip / OpenAI state dict file (used as is).
    `feature_layer`: the HF `hidden_states` index the checkpoint's VLM reads, checked against the
    backbone's layer."""
    state = read_checkpoint(path)
    if is_hf_clip(state):
        config = read_config(path)
        state, hf_config = clip_vision_from_hf(state), config.get("vision_config", config)
    else:
        state, hf_config = clip_vision_from_open_clip(state), None  # no config: the activation is up to the user
    load_vision_state(backbone, state, str(path), hf_config, feature_layer)


_HF_CLIP_VISION_DEFAULTS = {  # transformers' CLIPVisionConfig, for the keys a config.json leaves out
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


# open_clip always builds a text tower too, dropped at once by OpenClipBackbone: the smallest one will do
_UNUSED_TEXT_TOWER = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


def clip_backbone_from_hf(hf: dict, feature_layer: int = -2, source: str = "config.json") -> OpenClipBackbone:
    """A frozen OpenClipBackbone shaped like a HF `CLIPVisionConfig` (a CLIPVisionModel's config, or
    the `vision_config` of a CLIPModel or llava-hf folder), returning the patch tokens of HF's
    `hidden_states[feature_layer]` (LLaVA's `mm_vision_select_layer` / `vision_feature_layer`)."""
    config = {**_HF_CLIP_VISION_DEFAULTS, **hf}
    act, width, depth = config["hidden_act"], config["hidden_size"], config["num_hidden_layers"]
    problems = []
    if act not in ("quick_gelu", "gelu"):
        problems.append(f"hidden_act {act!r}: the tower implements quick_gelu (OpenAI's CLIP) and gelu")
    if not isinstance(feature_layer, int) or feature_layer == 0 or not -depth <= feature_layer <= depth:
        problems.append(f"feature layer {feature_layer!r}: flexvlm reads the output of one of the tower's {depth} "
                        f"blocks, hidden_states[1 .. {depth}] or [-{depth} .. -1]")
    raise_mismatches(problems, source, "vision towers flexvlm builds")
    vision_cfg = {
        "image_size": config["image_size"], "patch_size": config["patch_size"], "width": width, "layers": depth,
        "head_width": width // config["num_attention_heads"], "mlp_ratio": config["intermediate_size"] / width,
        "norm_kwargs": {"eps": config["layer_norm_eps"]},
    }
    model_kwargs = {"embed_dim": config["projection_dim"], "vision_cfg": vision_cfg, "text_cfg": _UNUSED_TEXT_TOWER,
                    "force_quick_gelu": act == "quick_gelu"}
    # every setting of the named model is overridden; LLaVA-1.5 keeps its tower frozen
    return OpenClipBackbone("ViT-L-14-336", layer=feature_block(feature_layer, depth), frozen=True,
                            model_kwargs=model_kwargs)
