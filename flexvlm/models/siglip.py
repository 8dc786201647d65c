"""SigLIP vision towers from transformers' checkpoints, built as timm ViTs (``TimmBackbone``): a tower
shaped like a transformers ``SiglipVisionConfig`` / ``Idefics3VisionConfig`` / ``SmolVLMVisionConfig``,
the rename tables between transformers' tensor names and timm's, and strict loading.

The two VLMs read the tower differently: LLaVA-OneVision (a ``SiglipVisionModel``) the output of a
block, ``hidden_states[vision_feature_layer]``, before ``post_layernorm``; SmolVLM / Idefics3 (its
``*VisionTransformer``) ``last_hidden_state``, after it (``final_norm=True``).

Both towers are the same network: a conv patch embedding with bias, learned position embeddings of
the (image_size // patch_size)^2 positions added (no class token, no norm before the blocks),
pre-norm blocks (LN1, attention with q / k / v / out projections with bias and scale head_dim^-0.5,
residual; LN2, fc1, activation, fc2, residual), then ``post_layernorm``. At the native image size
Idefics3's position ids (bucketised fractional coordinates, for its patch_attention_mask) are the
plain row-major ones; at other sizes flexvlm resamples the embeddings bicubically instead.
transformers' SigLIP attention-pooling head (``head.*``, ``vision_use_head``) is not part of the
tower: its tensors are ignored.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from timm.layers import LayerNorm
from torch import Tensor

from flexvlm.models.clip import _inverse_rename, _renamed, feature_block, fused_qkv_to_hf
from flexvlm.models.vision import TimmBackbone
from flexvlm.weights import StateDict, listing, load_state_dict_strict, raise_mismatches

__all__ = ["siglip_tower", "siglip_from_hf", "siglip_to_hf", "load_siglip", "SIGLIP_MEAN", "SIGLIP_STD"]

# what SigLIP's image processors normalise with (image_mean / image_std), Idefics3's and SmolVLM's too
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# transformers' config classes (5.x), for the keys a config.json leaves out; by `model_type`
_DEFAULTS = {
    "siglip_vision_model": {  # SiglipVisionConfig, google/siglip-base-patch16-224
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
    },
    "idefics3_vision": {  # Idefics3VisionConfig
        "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
    },
}
_DEFAULTS["smolvlm_vision"] = _DEFAULTS["idefics3_vision"]  # SmolVLMVisionConfig: the same values
# keys whose defaults differ between the classes: a config without `model_type` must give them
_AMBIGUOUS = sorted(k for k in _DEFAULTS["siglip_vision_model"]
                    if _DEFAULTS["siglip_vision_model"][k] != _DEFAULTS["idefics3_vision"][k])

# transformers' hidden_act -> timm's act_layer computing the same function the same way
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def _side(value: object) -> object:
    """An int, or a square [n, n] as transformers also accepts; anything else is returned as is."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _mlp_ratio(width: int, intermediate: int) -> float:
    """The ratio for which timm's `int(width * mlp_ratio)` is `intermediate` (the plain quotient can
    fall a hair short, e.g. 61 / 56)."""
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _navit_positions(grid: int) -> Tensor:
    """The position ids Idefics3 / SmolVLM give a full image of grid x grid patches at the native
    size, computed as transformers does (float32 fractional coordinates bucketised): row-major for
    most grids, but float rounding repeats some for others (19, 25, 29, 31, ...)."""
    cpu = torch.device("cpu")  # also while a model is built under `with torch.device("meta")`
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=cpu)
    step = 1.0 / torch.tensor([grid], device=cpu)  # an int count divided: float32, as in transformers
    fractional = torch.clamp(torch.arange(grid, dtype=torch.float32, device=cpu) * step, max=1.0 - 1e-6)
    buckets = torch.bucketize(fractional, boundaries, right=True)
    return (buckets[:, None] * grid + buckets[None, :]).flatten()


def _row_major(grid: int) -> bool:
    return torch.equal(_navit_positions(grid), torch.arange(grid * grid, device="cpu"))


def _siglip_config(vision_config: dict, source: str) -> dict:
    """`vision_config` with transformers' defaults filled in, every value the tower cannot reproduce refused."""
    model_type = vision_config.get("model_type")
    problems = []
    if model_type is None:
        absent = [k for k in _AMBIGUOUS if k not in vision_config]
        if absent:
            problems.append(f"model_type absent: {', '.join(absent)} must then be given (their defaults differ "
                            f"between SiglipVisionConfig and Idefics3VisionConfig / SmolVLMVisionConfig)")
        defaults = _DEFAULTS["siglip_vision_model"]  # the same as Idefics3's for every other key
    elif model_type in _DEFAULTS:
        defaults = _DEFAULTS[model_type]
    else:
        defaults = {}
        problems.append(f"model_type {model_type!r}: flexvlm builds the towers of {', '.join(sorted(_DEFAULTS))}")
    config = {**defaults, **vision_config}
    config["image_size"], config["patch_size"] = _side(config["image_size"]), _side(config["patch_size"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size"):
        if key in config and not (isinstance(config[key], int) and config[key] > 0):
            problems.append(f"{key} {config[key]!r}: expected a positive int (a square size for image_size / "
                            f"patch_size)")
    if not problems:
        if config["hidden_size"] % config["num_attention_heads"]:
            problems.append(f"num_attention_heads {config['num_attention_heads']}: does not divide hidden_size "
                            f"{config['hidden_size']}")
        grid = config["image_size"] // config["patch_size"]
        if not grid:
            problems.append(f"image_size {config['image_size']}: smaller than patch_size {config['patch_size']}")
        elif model_type in ("idefics3_vision", "smolvlm_vision") and not _row_major(grid):
            problems.append(f"image_size {config['image_size']} // patch_size {config['patch_size']} = {grid}: "
                            f"transformers' {model_type} positions of this grid are not row-major (float rounding "
                            f"in its bucketised coordinates repeats some), which the timm tower cannot reproduce")
    if config.get("hidden_act") not in _ACTIVATIONS:
        problems.append(f"hidden_act {config.get('hidden_act')!r}: the tower implements {', '.join(_ACTIVATIONS)}")
    if config.get("num_channels") != 3:
        problems.append(f"num_channels {config.get('num_channels')!r}: the tower reads RGB images (3)")
    raise_mismatches(problems, source, "SigLIP vision towers flexvlm builds")
    return config


def siglip_tower(
    vision_config: dict, layer: int = -1, final_norm: bool = False, frozen: bool = False,
    source: str = "vision_config",
) -> TimmBackbone:
    """A timm ViT TimmBackbone shaped like a transformers SigLIP vision config (a ``SiglipVisionConfig``,
    ``Idefics3VisionConfig`` or ``SmolVLMVisionConfig`` as a dict, e.g. a config.json's
    ``vision_config``; absent keys take that class's defaults, told apart by ``model_type``). Its
    mean and std are SigLIP's (0.5). Weights: ``load_siglip``.

    ``layer``: the transformers ``hidden_states`` index the tokens are (LLaVA-OneVision's
    ``vision_feature_layer``): -1 the last block's output, -k the k-th block from the end, k in
    1 .. depth the output of block k - 1; 0 (the embeddings) and lists of layers are refused.
    ``final_norm``: the tokens after ``post_layernorm`` too, i.e. ``last_hidden_state`` (SmolVLM /
    Idefics3); only with the last layer. Images must be multiples of the patch size: transformers'
    stride-p convolution ignores the last ``image_size % patch_size`` pixels of a side (e.g. 384 px
    with patch 14), which flexvlm leaves to its preprocessing (crop to 378 px: the same tokens)."""
    config = _siglip_config(vision_config, source)
    width, depth = config["hidden_size"], config["num_hidden_layers"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer == 0 or not -depth <= layer <= depth:
        raise_mismatches([f"vision feature layer {layer!r}: flexvlm reads the output of one of the tower's {depth} "
                          f"blocks, hidden_states[1 .. {depth}] or [-{depth} .. -1]"],
                         source, "SigLIP vision towers flexvlm builds")
    if final_norm and feature_block(layer, depth) != depth - 1:
        raise_mismatches([f"final_norm with vision feature layer {layer}: post_layernorm follows the last block "
                          f"alone (layer -1 or {depth})"], source, "SigLIP vision towers flexvlm builds")
    eps = config["layer_norm_eps"]
    model_kwargs = {
        "img_size": config["image_size"], "patch_size": config["patch_size"], "embed_dim": width, "depth": depth,
        "num_heads": config["num_attention_heads"], "mlp_ratio": _mlp_ratio(width, config["intermediate_size"]),
        "qkv_bias": True, "class_token": False, "no_embed_class": True, "reg_tokens": 0, "pre_norm": False,
        "final_norm": True, "fc_norm": False, "global_pool": "", "init_values": None,
        "act_layer": _ACTIVATIONS[config["hidden_act"]], "norm_layer": partial(LayerNorm, eps=eps),
        "attn_drop_rate": float(config.get("attention_dropout") or 0.0),
        "pretrained_cfg_overlay": {"mean": SIGLIP_MEAN, "std": SIGLIP_STD},
    }
    # every setting of the named model is overridden
    backbone = TimmBackbone("vit_base_patch16_siglip_224", layer=feature_block(layer, depth), frozen=frozen,
                            model_kwargs=model_kwargs, final_norm=final_norm)
    fc1 = backbone.model.blocks[0].mlp.fc1
    assert fc1.out_features == config["intermediate_size"], (fc1, config["intermediate_size"])
    return backbone


_SIGLIP_HF_RENAMES = [  # (transformers Siglip / Idefics3 vision pattern, timm VisionTransformer name)
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),  # (N, C) -> (1, N, C)
    (r"post_layernorm\.", "norm."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
]
_SIGLIP_TIMM_RENAMES = [_inverse_rename(pattern, new) for pattern, new in _SIGLIP_HF_RENAMES]
_SIGLIP_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_SIGLIP_TIMM_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
# SiglipVisionModel's attention-pooling head (vision_use_head), never part of the tower; position_ids:
# a buffer older transformers versions saved
_SIGLIP_HF_IGNORED = ("head.", "embeddings.position_ids")


def siglip_from_hf(state: StateDict, prefix: str) -> StateDict:
    """The SigLIP tower held under `prefix` in a transformers state dict -> timm VisionTransformer names.

    Prefixes: ``vision_model.`` (a hub SiglipVisionModel / SiglipModel), ``""`` (a SiglipVisionModel
    saved by transformers 5), ``vision_tower.vision_model.`` / ``model.vision_tower.vision_model.`` /
    ``vision_tower.`` / ``model.vision_tower.`` (LLaVA-OneVision: transformers 4.x, and 5.x as saved
    / as held in memory), ``model.vision_model.`` (SmolVLM / Idefics3). Tensors outside `prefix` are
    left out, so are the pooling head and `position_ids`; q / k / v become one `qkv` (q, k, v
    concatenated); unknown names pass through unchanged (and fail the strict load)."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name.startswith(_SIGLIP_HF_IGNORED):
            continue
        if match := _SIGLIP_HF_QKV.fullmatch(name):
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
            continue
        new = _renamed(name, _SIGLIP_HF_RENAMES)
        out[new] = tensor[None] if new == "pos_embed" else tensor
    for (layer, kind), tensors in qkv.items():
        if set(tensors) == {"q", "k", "v"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([tensors[c] for c in "qkv"])
        else:  # incomplete: keep the transformers names so the strict load reports them
            out.update({f"encoder.layers.{layer}.self_attn.{c}_proj.{kind}": t for c, t in tensors.items()})
    return out


def siglip_to_hf(state: StateDict, prefix: str) -> StateDict:
    """The inverse of `siglip_from_hf` for a tower as TimmBackbone keeps it: timm names -> transformers
    names under `prefix`, `qkv` split into q / k / v (copies: safetensors stores no tensors that
    share memory). Blocks and the norm a pruned tower dropped are simply absent."""
    return fused_qkv_to_hf(state, _SIGLIP_TIMM_QKV, _SIGLIP_TIMM_RENAMES, prefix, unbatched=("pos_embed",))


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _pruned_expected(backbone: TimmBackbone) -> dict[str, torch.Size]:
    """Names and shapes of what the backbone dropped (blocks after its layer; the final norm unless
    kept) that a checkpoint of the whole tower holds: checked, then left out of the load."""
    model = backbone.model
    block = {name: t.shape for name, t in model.blocks[0].state_dict().items()}
    expected = {f"blocks.{i}.{name}": shape for i in range(len(model.blocks), backbone.depth)
                for name, shape in block.items()}
    if not backbone.final_norm:
        expected.update({f"norm.{kind}": torch.Size([backbone.embed_dim]) for kind in ("weight", "bias")})
    return expected


def load_siglip(backbone: TimmBackbone, state: StateDict, prefix: str, source: str) -> None:
    """The SigLIP tower held under `prefix` in a transformers state dict (see `siglip_from_hf`) into a
    `siglip_tower`. Strict: the checkpoint must hold the whole tower the backbone was shaped as
    (every block, `post_layernorm`), each tensor of its shape, and nothing else under `prefix` but
    the pooling head; what the backbone dropped after its layer is checked, then not loaded."""
    if not isinstance(backbone, TimmBackbone):
        raise TypeError(f"SigLIP weights load into a TimmBackbone (siglip_tower), got {type(backbone).__name__}")
    renamed = siglip_from_hf(state, prefix)
    if not renamed:
        starts = sorted({".".join(k.split(".")[:2]) + "." for k in state})[:8]
        raise ValueError(f"{source}: no tensors under the prefix {prefix!r} of the SigLIP tower; its names start "
                         f"with {', '.join(map(repr, starts)) or 'nothing (empty)'}")
    pruned = _pruned_expected(backbone)
    missing = [f"{k} {tuple(shape)}" for k, shape in pruned.items() if k not in renamed]
    mis_shaped = [f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(shape)}"
                  for k, shape in pruned.items() if k in renamed and renamed[k].shape != shape]
    if missing or mis_shaped:
        message = (f"{source} does not match the {backbone.depth}-block SigLIP tower (prefix {prefix!r}), "
                   f"in what the tower drops after its layer:")
        for title, lines in (("missing", missing), ("shape mismatch", mis_shaped)):
            if lines:
                message += listing(title, lines)
        raise ValueError(message)
    kept = {k: v for k, v in renamed.items() if k not in pruned}
    load_state_dict_strict(backbone.model, kept, f"{source} (prefix {prefix!r})")
