"""Pre-trained weights from local files: LLaVA-1.5, decoders (LLaMA / Vicuna, Qwen2, Gemma) and CLIP
vision towers.

Each kind of checkpoint has a plain rename function (litgpt style) from its tensor names to
flexvlm's, and each decoder family a reader of its transformers `config.json`. The layout is told
from the files (tensor names, `config.json`), never from a folder name, and nothing is ever
downloaded. A folder holds `model.safetensors`, `pytorch_model.bin` or either sharded with an
`*.index.json`; pickled files are read with `weights_only=True`.

Every load is strict: a missing, unexpected or mis-shaped tensor is a ValueError that lists the
names and shapes, and `config.json` settings that no shape reveals (RMSNorm eps, RoPE, the CLIP
activation, the LLaVA feature layer) are checked against the model that receives the weights.

`arguments_from_llava` (behind `FlexVLM.from_pretrained`) goes one step further: it reads the model
itself from a LLaVA folder's `config.json`, the `extra` settings of the authors' released
FlexAttention checkpoint included, so that nothing has to be written by hand to match a checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from flexvlm.models.decoder import DecoderConfig, LanguageModel
from flexvlm.models.gemma import Gemma, GemmaConfig
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.qwen2 import Qwen2, Qwen2Config
from flexvlm.models.vision import OpenClipBackbone, VisionBackbone
from flexvlm.run_files import read_run_checkpoint
from flexvlm.weights import listing, load_state_dict_strict, read_state_dict
from flexvlm.selection import SELECTION, AttentionSelection, RandomSelection, SelectionStrategy

if TYPE_CHECKING:
    from flexvlm.models.vlm import FlexVLM

__all__ = [
    "PretrainedWeights",
    "arguments_from_llava",
    "decoder_config_from_hf",
    "llama_config_from_hf",
    "qwen2_config_from_hf",
    "gemma_config_from_hf",
    "clip_backbone_from_hf",
    "read_checkpoint",
    "read_config",
    "llama_from_hf",
    "clip_vision_from_hf",
    "clip_vision_from_open_clip",
    "load_llm_weights",
    "load_clip_vision",
    "load_projector",
    "load_llava",
    "load_run_weights",
]

StateDict = dict[str, Tensor]

# in the order transformers prefers them
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


# -- reading -------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> StateDict:
    """All tensors of a weights file, or of a HF-style folder (single file or index + shards)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return read_state_dict(path)
    for name in _WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(path / shard).items()}
        return read_state_dict(file)
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}")


def read_config(path: str | Path) -> dict:
    """`config.json` beside the weights; empty for a bare weights file."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _take(state: StateDict, prefixes: dict[str, tuple[str, str]], source: str) -> dict[str, StateDict]:
    """Split `state` into parts by name prefix: `{checkpoint prefix: (part, new prefix)}`, longest
    prefix first. A tensor that no prefix claims is an error."""
    parts: dict[str, StateDict] = {part: {} for part, _ in prefixes.values()}
    longest_first = sorted(prefixes, key=len, reverse=True)
    unclaimed = []
    for name, tensor in state.items():
        match = next((p for p in longest_first if name.startswith(p)), None)
        if match is None:
            unclaimed.append(f"{name} {tuple(tensor.shape)}")
            continue
        part, new_prefix = prefixes[match]
        parts[part][new_prefix + name[len(match):]] = tensor
    if unclaimed:
        raise ValueError(f"{source}: tensors of no known part:" + listing("unclaimed", unclaimed))
    return parts


def _put(parts: dict[str, StateDict], prefixes: dict[str, tuple[str, str]], target: str) -> StateDict:
    """The inverse of `_take`, with the same table: each part's tensors under the checkpoint prefix of
    their flexvlm prefix (the first listed where several spellings read into one). A tensor that no
    prefix places is an error."""
    placed, unplaced = {}, []
    for part, state in parts.items():
        spellings: dict[str, str] = {}  # flexvlm prefix -> checkpoint prefix
        for checkpoint_prefix, (owner, new_prefix) in prefixes.items():
            if owner == part:
                spellings.setdefault(new_prefix, checkpoint_prefix)
        longest_first = sorted(spellings, key=len, reverse=True)
        for name, tensor in state.items():
            match = next((p for p in longest_first if name.startswith(p)), None)
            if match is None:
                unplaced.append(f"{part}: {name} {tuple(tensor.shape)}")
                continue
            placed[spellings[match] + name[len(match):]] = tensor
    if unplaced:
        raise ValueError(f"the {target} layout has no place for these tensors:" + listing("unplaced", unplaced))
    return placed


# -- rename tables ---------------------------------------------------------------------------------
# W_K' / W_V' (`self_attn.{k,v}...`) as the authors' released checkpoint names them, and as flexvlm does
_RELEASED_HIGH_RES, _FLEXVLM_HIGH_RES = "_proj_hd.", "_hr_proj."


def _high_res_renamed(state: StateDict, old: str, new: str) -> StateDict:
    pattern = re.compile(rf"(self_attn\.[kv]){re.escape(old)}")
    return {pattern.sub(rf"\1{new}", k): v for k, v in state.items()}


def llama_from_hf(state: StateDict) -> StateDict:
    """`LlamaForCausalLM` names (which `Qwen2ForCausalLM` and `GemmaForCausalLM` share) are flexvlm's
    already; the RoPE buffers that older transformers versions saved are dropped (they are
    recomputed), and the authors' released FlexAttention checkpoint names W_K' / W_V'
    `self_attn.{k,v}_proj_hd`, flexvlm `self_attn.{k,v}_hr_proj`."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return _high_res_renamed(state, _RELEASED_HIGH_RES, _FLEXVLM_HIGH_RES)


def llama_to_hf(state: StateDict) -> StateDict:
    """The inverse of `llama_from_hf`: W_K' / W_V' under the release's names (`flexvlm.export`)."""
    return _high_res_renamed(state, _FLEXVLM_HIGH_RES, _RELEASED_HIGH_RES)


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


def clip_vision_to_hf(state: StateDict) -> StateDict:
    """The inverse of `clip_vision_from_hf` for a tower as OpenClipBackbone keeps it (no head): open_clip
    `VisionTransformer` names -> HF `CLIPVisionModel` names (`vision_model.*`), `in_proj` split into
    q / k / v (copies: safetensors stores no tensors that share memory)."""
    out: StateDict = {}
    for name, tensor in state.items():
        if match := _CLIP_OPEN_CLIP_QKV.fullmatch(name):
            layer, kind = match.groups()
            for which, part in zip("qkv", tensor.chunk(3)):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{which}_proj.{kind}"] = part.clone()
        else:
            out["vision_model." + _renamed(name, _CLIP_OPEN_CLIP_RENAMES)] = tensor
    return out


def clip_vision_from_open_clip(state: StateDict) -> StateDict:
    """An open_clip / OpenAI CLIP state dict (whole model: its `visual.*` part) -> the vision tower's."""
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def _is_hf_clip(state: StateDict) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in state)


# -- config checks ---------------------------------------------------------------------------------
def _raise_mismatches(problems: list[str], source: str, what: str) -> None:
    if problems:
        raise ValueError(f"{source}: config.json does not match the {what}:\n  " + "\n  ".join(problems))


# transformers' defaults of each family's config, for the keys a config.json leaves out (llava-hf saves
# only the keys that differ from them: its 7B `text_config` names the vocabulary, 32064, not the sizes)
_HF_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "hidden_act": "silu",
}
_HF_QWEN2_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
_HF_GEMMA_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
}


def _decoder_config(
    config_class: type[DecoderConfig], hf: dict, defaults: dict, activations: tuple[str, ...], problems: list[str],
    source: str, **fields: Any,
) -> DecoderConfig:
    """A family's config from a transformers config.json (or llava-hf's `text_config`), an absent key
    meaning transformers' default (`defaults`), as in transformers itself. Settings that the decoder
    does not implement are refused: `problems` found by the family, an activation not in
    `activations`, a RoPE type other than the default."""
    hf, problems = {**defaults, **hf}, list(problems)
    act = hf.get("hidden_activation") or hf["hidden_act"]  # old Gemma configs name it hidden_activation
    if act not in activations:
        problems.append(f"hidden_act {act!r}: the decoder implements {' / '.join(activations)} only")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE type {rope_type!r}: the decoder implements the default RoPE only")
    _raise_mismatches(problems, source, "decoder flexvlm implements")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    # a family whose transformers config sets a head size of its own (Gemma) keeps it; elsewhere it is
    # derived from the width, as a preset's is
    explicit_head = "head_dim" in defaults or head_dim != hidden // heads
    return config_class(**{
        "vocab_size": hf["vocab_size"], "hidden_size": hidden, "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"], "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads"),
        "head_size": head_dim if explicit_head else None,
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rms_norm_eps": hf["rms_norm_eps"],
        "max_position_embeddings": hf["max_position_embeddings"], "tie_word_embeddings": hf["tie_word_embeddings"],
        **fields,
    })


def llama_config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """A transformers LLaMA config (`config.json`, or llava-hf's `text_config`) as a LlamaConfig."""
    return _decoder_config(LlamaConfig, hf, _HF_LLAMA_DEFAULTS, ("silu",), [], source,
                           attention_bias=hf.get("attention_bias", False))


def qwen2_config_from_hf(hf: dict, source: str = "config.json") -> Qwen2Config:
    """A transformers Qwen2 config as a Qwen2Config: q/k/v bias always; sliding windows refused."""
    sliding = hf.get("use_sliding_window")
    problems = ["use_sliding_window: the decoder implements full attention only"] if sliding else []
    return _decoder_config(Qwen2Config, hf, _HF_QWEN2_DEFAULTS, ("silu",), problems, source, attention_bias=True)


def gemma_config_from_hf(hf: dict, source: str = "config.json") -> GemmaConfig:
    """A transformers Gemma (1) config as a GemmaConfig. Gemma's released configs say `gelu`, which
    transformers reads as the tanh approximation, as flexvlm does."""
    problems = ["attention_bias: Gemma's projections have no bias in flexvlm"] if hf.get("attention_bias") else []
    return _decoder_config(GemmaConfig, hf, _HF_GEMMA_DEFAULTS, ("gelu", "gelu_pytorch_tanh"), problems, source)


@dataclass(frozen=True)
class _HFDecoder:
    """How a family's transformers checkpoints are read."""

    family: type[LanguageModel]
    read_config: Callable[[dict, str], DecoderConfig]
    rename: Callable[[StateDict], StateDict]
    model_types: tuple[str, ...]  # config.json `model_type`s of the family, LLaVA's own among them


# transformers' Qwen2 and Gemma use LLaMA's tensor names: one rename function serves the three
_HF_DECODERS = (
    _HFDecoder(Llama, llama_config_from_hf, llama_from_hf, ("llama", "llava_llama")),
    _HFDecoder(Qwen2, qwen2_config_from_hf, llama_from_hf, ("qwen2", "llava_qwen")),
    _HFDecoder(Gemma, gemma_config_from_hf, llama_from_hf, ("gemma",)),
)


def _hf_decoder(llm: LanguageModel, source: str) -> _HFDecoder:
    entry = next((e for e in _HF_DECODERS if type(llm) is e.family), None)
    if entry is None:
        raise ValueError(f"{source}: flexvlm reads no transformers checkpoint into a {type(llm).__name__}; register "
                         f"its config reader and rename function in flexvlm.checkpoints._HF_DECODERS")
    return entry


def decoder_config_from_hf(hf: dict, source: str = "config.json") -> tuple[type[LanguageModel], DecoderConfig]:
    """The family (by `model_type`; LLaMA when there is none, as in LLaVA-1.5's configs) and the config
    of a transformers / LLaVA config.json's decoder."""
    model_type = hf.get("model_type", "llama")
    for entry in _HF_DECODERS:
        if model_type in entry.model_types:
            return entry.family, entry.read_config(hf, source)
    known = [t for entry in _HF_DECODERS for t in entry.model_types]
    raise ValueError(f"{source}: config.json model_type {model_type!r} is no decoder family flexvlm implements "
                     f"({', '.join(known)})")


_SHAPELESS_DECODER_SETTINGS = ("rms_norm_eps", "rope_theta", "tie_word_embeddings")


def _check_decoder_config(entry: _HFDecoder, llm: LanguageModel, hf: dict, source: str) -> None:
    """The checkpoint's family, and settings that no tensor shape reveals: a wrong one gives silently
    wrong logits."""
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in entry.model_types:
        _raise_mismatches([f"model_type {model_type!r}: the model's decoder is {type(llm).__name__}"], source,
                          "language model (llm)")
    found = entry.read_config(hf, source)
    problems = [
        f"{k}: checkpoint {getattr(found, k)} vs model {getattr(llm.config, k)}"
        for k in _SHAPELESS_DECODER_SETTINGS if getattr(found, k) != getattr(llm.config, k)
    ]
    _raise_mismatches(problems, source, "language model (llm / llm_overrides)")


def _check_clip_config(visual: nn.Module, hf: dict, source: str) -> None:
    # HF CLIP (OpenAI's weights) uses quick_gelu; open_clip builds nn.GELU unless told otherwise
    quick = isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    act = hf.get("hidden_act", "quick_gelu")
    if (act == "quick_gelu") != quick:
        _raise_mismatches(
            [f"hidden_act {act!r} vs model {'quick_gelu' if quick else 'gelu'}: build OpenClipBackbone with a "
             f"'-quickgelu' model name (or model_kwargs {{force_quick_gelu: true}}) exactly when the checkpoint "
             f"uses quick_gelu"],
            source, "vision tower",
        )


# -- loaders ----------------------------------------------------------------------------------------
def _high_res_copies(names: Iterable[str], state: StateDict) -> StateDict:
    """The W_K', W_V' among ``names`` (a model's parameter names) that ``state`` lacks (a LLaMA
    checkpoint, or a run without FlexAttention in that layer): they start as the same layer's
    loaded W_K, W_V (the paper's initialisation)."""
    return {
        name: state[source]
        for name in names
        if "_hr_proj." in name and name not in state and (source := name.replace("_hr_proj.", "_proj.")) in state
    }


def _load_decoder_state(llm: LanguageModel, state: StateDict, source: str, hf_config: dict) -> None:
    entry = _hf_decoder(llm, source)
    if hf_config:
        _check_decoder_config(entry, llm, hf_config, source)
    names = llm.state_dict()
    # the release saves W_K' / W_V' in every layer but uses them from N_SA on: the layers this model
    # keeps plain have no use for them
    state = {k: v for k, v in entry.rename(state).items() if "_hr_proj." not in k or k in names}
    if llm.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied: saved once
    load_state_dict_strict(llm, {**state, **_high_res_copies(names, state)}, source)


def load_llm_weights(llm: LanguageModel, path: str | Path) -> None:
    """A transformers LLaMA / Vicuna / Qwen2 / Gemma folder (`save_pretrained`) or weights file into `llm`."""
    _load_decoder_state(llm, read_checkpoint(path), str(path), read_config(path))


def _feature_block(layer: int, depth: int) -> int:
    """HF `hidden_states[layer]` of a `depth`-block tower is the output of this block (index 0 is
    the embeddings)."""
    return layer % (depth + 1) - 1


_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _pruned(name: str, kept: int) -> bool:
    """Weights of what OpenClipBackbone drops after its layer (later blocks, final norm, head): they
    have no place to go."""
    block = _BLOCK.match(name)
    return name == "proj" or name.startswith("ln_post.") or (block is not None and int(block.group(1)) >= kept)


def _load_vision_state(
    backbone: VisionBackbone, state: StateDict, source: str, hf_config: dict | None, feature_layer: int | None
) -> None:
    """An open_clip-named tower state dict into a (pruned) OpenClipBackbone."""
    if not isinstance(backbone, OpenClipBackbone):
        raise TypeError(f"CLIP weights load into an OpenClipBackbone, got {type(backbone).__name__}")
    visual = backbone.visual
    if hf_config is not None:
        _check_clip_config(visual, hf_config, source)
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if feature_layer is not None and blocks and _feature_block(feature_layer, len(blocks)) != backbone.block_index:
        _raise_mismatches(
            [f"the LLaVA feature layer {feature_layer} of a {len(blocks)}-block tower is block "
             f"{_feature_block(feature_layer, len(blocks))}, the backbone returns block {backbone.block_index}"],
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
    if _is_hf_clip(state):
        config = read_config(path)
        state, hf_config = clip_vision_from_hf(state), config.get("vision_config", config)
    else:
        state, hf_config = clip_vision_from_open_clip(state), None  # no config: the activation is up to the user
    _load_vision_state(backbone, state, str(path), hf_config, feature_layer)


_PROJECTOR_PREFIXES = {prefix: ("projector", "") for prefix in ("model.mm_projector.", "mm_projector.", "")}


def load_projector(projector: nn.Module, path: str | Path) -> None:
    """A LLaVA projector file (e.g. the pre-training stage's `mm_projector.bin`)."""
    parts = _take(read_checkpoint(path), _PROJECTOR_PREFIXES, str(path))
    load_state_dict_strict(projector, parts["projector"], str(path))


@dataclass(frozen=True)
class _LlavaLayout:
    name: str
    markers: tuple[str, ...]  # name prefixes of its projector, found in no other layout
    prefixes: dict[str, tuple[str, str]]  # checkpoint prefix -> (part, flexvlm prefix)
    feature_layer_key: str
    select_key: str
    patch_only: str  # the select value that keeps patch tokens only, as flexvlm does


_LLAVA_LAYOUTS = (
    _LlavaLayout(
        "llava-hf (LlavaForConditionalGeneration)", ("multi_modal_projector.", "model.multi_modal_projector."),
        {
            # files on disk; the second spelling is transformers' in-memory module tree
            "language_model.model.": ("llm", "model."), "language_model.lm_head.": ("llm", "lm_head."),
            "model.language_model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
            "multi_modal_projector.linear_1.": ("projector", "0."),
            "multi_modal_projector.linear_2.": ("projector", "2."),
            "model.multi_modal_projector.linear_1.": ("projector", "0."),
            "model.multi_modal_projector.linear_2.": ("projector", "2."),
            "vision_tower.": ("vision", ""), "model.vision_tower.": ("vision", ""),
        },
        "vision_feature_layer", "vision_feature_select_strategy", "default",
    ),
    _LlavaLayout(
        "original LLaVA (LlavaLlamaForCausalLM)", ("model.mm_projector.",),
        {
            "model.mm_projector.": ("projector", ""), "model.vision_tower.vision_tower.": ("vision", ""),
            "model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
        },
        "mm_vision_select_layer", "mm_vision_select_feature", "patch",
    ),
)


LLAVA_HF_LAYOUT, ORIGINAL_LLAVA_LAYOUT = _LLAVA_LAYOUTS  # by name, for the writer (`flexvlm.export`)


def _llava_layout(state: StateDict, source: str) -> _LlavaLayout:
    for layout in _LLAVA_LAYOUTS:
        if any(k.startswith(layout.markers) for k in state):
            return layout
    raise ValueError(
        f"{source} is not a LLaVA checkpoint: no multimodal projector (multi_modal_projector.* or "
        f"model.mm_projector.*); for a language model alone use PretrainedWeights(llm=...)"
    )


def load_llava(model: FlexVLM, path: str | Path, vision: str | Path | None = None) -> None:
    """A LLaVA-1.5 folder into `model`: the llava-hf layout (language model, projector, CLIP tower)
    or the original one (LLaMA names plus `model.mm_projector.*`; the tower is a separate folder,
    `vision`, which also replaces a tower held in `path`)."""
    source = str(path)
    state, config = read_checkpoint(path), read_config(path)
    layout = _llava_layout(state, source)
    select = config.get(layout.select_key, layout.patch_only)
    if select != layout.patch_only:
        _raise_mismatches([f"{layout.select_key} {select!r}: flexvlm feeds patch tokens only ({layout.patch_only!r})"],
                          source, "model")
    parts = _take(state, layout.prefixes, f"{source} ({layout.name})")
    _load_decoder_state(model.llm, parts["llm"], source, config.get("text_config", config))
    load_state_dict_strict(model.projector, parts["projector"], source)
    feature_layer = config.get(layout.feature_layer_key, -2)
    if vision is not None:
        load_clip_vision(model.encoder.backbone, vision, feature_layer)
    elif parts["vision"]:
        vision_state = clip_vision_from_hf(parts["vision"])
        _load_vision_state(model.encoder.backbone, vision_state, source, config.get("vision_config"), feature_layer)
    else:
        raise ValueError(
            f"{source} ({layout.name}) holds no vision tower (its config names "
            f"{config.get('mm_vision_tower')!r}); give the local CLIP folder as `vision`"
        )


def load_run_weights(model: nn.Module, aux_objective: nn.Module | None, path: str | Path) -> None:
    """Start from another flexvlm run's weights (its Lightning checkpoint, e.g. ``last.ckpt``),
    without its optimizer or step count: the VLM's tensors strictly (W_K', W_V' that the source
    lacks, e.g. a low-res-only run, start as the same layer's W_K, W_V), and the auxiliary
    objective's when both runs have one. A mismatch lists the names and shapes involved."""
    source = str(path)
    checkpoint = read_run_checkpoint(path)
    parts = _take(checkpoint["state_dict"], {"model.": ("model", ""), "aux_objective.": ("aux", "")}, source)
    names = model.state_dict()
    load_state_dict_strict(model, {**_high_res_copies(names, parts["model"]), **parts["model"]}, source)
    if aux_objective is not None and parts["aux"]:
        load_state_dict_strict(aux_objective, parts["aux"], source)


class PretrainedWeights:
    """Which local weights a FlexVLM starts from; a config names it as `FlexVLM(pretrained=...)`.

    `llava`: a LLaVA-1.5 folder (either layout); `llm`: a decoder folder instead of it (LLaMA / Vicuna,
    Qwen2 or Gemma, as transformers' `save_pretrained` writes it, into a decoder of that family);
    `vision`: a CLIP folder or state dict file (needed with the original LLaVA layout);
    `projector`: a projector file (e.g. `mm_projector.bin`), loaded last.
    """

    def __init__(
        self,
        llava: str | None = None,
        llm: str | None = None,
        vision: str | None = None,
        projector: str | None = None,
    ) -> None:
        if llava is not None and llm is not None:
            raise ValueError("give `llava` or `llm`, not both: a LLaVA checkpoint holds the language model")
        self.llava, self.llm, self.vision, self.projector = llava, llm, vision, projector

    def apply(self, model: FlexVLM) -> None:
        """Load what is given; W_K', W_V' that the language model's checkpoint lacks start as its
        W_K, W_V (those it holds, as in the authors' released checkpoint, are loaded)."""
        if self.llava is not None:
            load_llava(model, self.llava, self.vision)
        else:
            if self.llm is not None:
                load_llm_weights(model.llm, self.llm)
            if self.vision is not None:
                load_clip_vision(model.encoder.backbone, self.vision)
        if self.projector is not None:
            load_projector(model.projector, self.projector)


# -- a model built from a checkpoint's own config.json ------------------------------------------------
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
    _raise_mismatches(problems, source, "vision towers flexvlm builds")
    vision_cfg = {
        "image_size": config["image_size"], "patch_size": config["patch_size"], "width": width, "layers": depth,
        "head_width": width // config["num_attention_heads"], "mlp_ratio": config["intermediate_size"] / width,
        "norm_kwargs": {"eps": config["layer_norm_eps"]},
    }
    model_kwargs = {"embed_dim": config["projection_dim"], "vision_cfg": vision_cfg, "text_cfg": _UNUSED_TEXT_TOWER,
                    "force_quick_gelu": act == "quick_gelu"}
    # every setting of the named model is overridden; LLaVA-1.5 keeps its tower frozen
    return OpenClipBackbone("ViT-L-14-336", layer=_feature_block(feature_layer, depth), frozen=True,
                            model_kwargs=model_kwargs)


# What the authors' release hard-codes rather than reads from `extra`: FlexAttention from layer 9 on
# (`layer_idx > 8`), the threshold rule on 9 x 9 blocks, the random ablation's Bernoulli(0.1) on 8 x 8 blocks.
_RELEASE_SA_LAYERS = 9
_RELEASE_BLOCK_GRID = 9
_RELEASE_RANDOM_BLOCK_GRID = 8
_RELEASE_RANDOM_RATE = 0.1


def _extra_int(extra: dict, key: str, source: str, default: int | None = None) -> int:
    """An integer setting of the release's `extra` (written as a string)."""
    value = extra.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: config.json extra {key!r} = {value!r} is not an integer") from None


def _release_selection(extra: dict, source: str) -> SelectionStrategy:
    """The release's selection, on whole blocks as it keeps them: its threshold rule, or with
    `special: random` the flexvlm strategy closest to its Bernoulli(0.1) draw on 8 x 8 blocks (10 %
    of the image's blocks, a fixed count instead of a varying one)."""
    special = extra.get("special")
    if special == "random":
        return RandomSelection(ratio=_RELEASE_RANDOM_RATE, block_grid=_RELEASE_RANDOM_BLOCK_GRID, whole_blocks=True)
    if special is not None:
        raise ValueError(f"{source}: config.json extra 'special' = {special!r}; the release knows 'random' only")
    threshold = _extra_int(extra, "threshold", source, default=64)  # the release's default when unset
    return AttentionSelection(threshold=threshold, block_grid=_RELEASE_BLOCK_GRID, whole_blocks=True)


def _release_arguments(extra: dict, tower_size: int, source: str) -> dict[str, Any]:
    """FlexVLM arguments from the `extra` settings of the authors' released checkpoint; none for a
    checkpoint without them (the release reads `extra` only when it names `zoom_ratio`). The warm-up
    (`warmup`) is a training setting: the LightningModule's `alpha_warmup` is 1 / warmup."""
    if "zoom_ratio" not in extra:
        return {}
    zoom = _extra_int(extra, "zoom_ratio", source)
    problems = []
    low_res = _extra_int(extra, "lowres_size", source, default=tower_size)
    if low_res != tower_size:
        problems.append(f"extra lowres_size {low_res}: flexvlm's low-res view is the tower's native size, {tower_size}")
    high_res = _extra_int(extra, "highres_size", source, default=zoom * low_res)
    if high_res != zoom * low_res:
        problems.append(f"extra highres_size {high_res}: flexvlm's high-res image is zoom_ratio x lowres_size, "
                        f"{zoom * low_res}")
    _raise_mismatches(problems, source, "model flexvlm builds")
    return {"num_sa_layers": _RELEASE_SA_LAYERS, "zoom": zoom, "selection": _release_selection(extra, source),
            "margin_rule": "release"}


def _exported_arguments(saved: dict) -> dict[str, Any]:
    """FlexVLM arguments that `flexvlm.export` writes under `extra.flexvlm`: the model as trained, where
    the release's own keys cannot say it (it hard-codes N_SA, the blocks and the margin rule). The
    selection is named as registered (plugins included), with the arguments it was built with."""
    arguments = dict(saved)
    if "selection" in arguments:
        selection = arguments["selection"]
        arguments["selection"] = SELECTION.get(selection["name"])(**selection["settings"])
    return arguments


def _llava_config(folder: Path) -> dict:
    """The folder's config.json, which the model is built from."""
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config = read_config(folder)
    if not config:
        raise FileNotFoundError(f"no config.json in {folder}: the model is built from it")
    return config


def _is_llava_hf(config: dict) -> bool:
    """llava-hf nests its decoder's and its tower's configs; the original layout is LLaMA's config
    plus `mm_*` keys."""
    return "vision_config" in config


def _vision_tower(folder: Path, config: dict, vision: str | Path | None) -> tuple[str | None, dict]:
    """Where the tower's weights come from (None: the checkpoint, as llava-hf holds its tower) and its
    HF config. Without `vision`, the original layout's tower is `mm_vision_tower` if that names a
    local folder (relative to the checkpoint)."""
    if vision is None and _is_llava_hf(config):
        return None, config["vision_config"]
    if vision is None:
        named = config.get("mm_vision_tower")
        if not named or not (folder / named).is_dir():
            raise ValueError(f"{folder}: the vision tower {named!r} (config.json mm_vision_tower) is not a local "
                             f"folder; give the local CLIP folder as `vision`")
        vision = folder / named
    tower_config = read_config(vision)
    if not tower_config:
        raise ValueError(f"{vision}: no config.json; the tower is built from a HF CLIPModel / CLIPVisionModel folder")
    return str(vision), tower_config.get("vision_config", tower_config)


def _llava_projector(config: dict, source: str) -> str:
    """The projector kind (`build_projector`): the original layout names it; llava-hf's is always
    linear, activation, linear."""
    if not _is_llava_hf(config):
        return config.get("mm_projector_type", "linear")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        _raise_mismatches([f"projector_hidden_act {act!r}: the mlp2x_gelu projector uses gelu"], source, "projector")
    return "mlp2x_gelu"


def arguments_from_llava(
    checkpoint: str | Path,
    vision: str | Path | None = None,
    num_sa_layers: int | None = None,
    selection: SelectionStrategy | str | None = None,
    zoom: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """FlexVLM's constructor arguments for a local LLaVA-1.5 folder, read from its config.json: the
    llava-hf layout, the original one, or the authors' released FlexAttention checkpoint (the
    original plus `*_proj_hd` and an `extra` object). The decoder's family (`model_type`), sizes,
    vocabulary, RMSNorm eps, RoPE theta and maximum length (llava-hf: `text_config`); the projector;
    the CLIP tower's shape, activation and feature layer (llava-hf: `vision_config`; otherwise the
    config of `vision`, which defaults to `mm_vision_tower` when that is a local folder), frozen as
    LLaVA-1.5 keeps it; the weights (`pretrained`).

    With the release's `extra`: N_SA = 9 (what the release hard-codes), zoom `zoom_ratio`, and its
    selection, keeping whole blocks (`_release_selection`). Without, FlexVLM's defaults. A flexvlm
    export's `extra.flexvlm` (`flexvlm.export`) then gives the model as trained.
    `num_sa_layers`, `selection` and `zoom` replace the checkpoint's when given; `overrides` are
    any other FlexVLM arguments (`mode`, ...), `llm_overrides` changing single decoder settings."""
    folder = Path(checkpoint)
    source = str(folder)
    config = _llava_config(folder)
    family, llm = decoder_config_from_hf(config.get("text_config", config), source)
    tower, tower_config = _vision_tower(folder, config, vision)
    feature_key = "vision_feature_layer" if _is_llava_hf(config) else "mm_vision_select_layer"
    backbone = clip_backbone_from_hf(tower_config, config.get(feature_key, -2), tower or source)
    arguments = {
        "backbone": backbone,
        "llm": family(replace(llm, **overrides.pop("llm_overrides", {}))),
        "projector": _llava_projector(config, source),
        "pretrained": PretrainedWeights(llava=source, vision=tower),
        **_release_arguments(config.get("extra") or {}, backbone.image_size, source),
        **_exported_arguments((config.get("extra") or {}).get("flexvlm") or {}),
    }
    if overrides.get("mode", arguments.get("mode", "flex")) != "flex":  # a selection serves the flex mode alone
        arguments.pop("selection", None)
    chosen = {"num_sa_layers": num_sa_layers, "selection": selection, "zoom": zoom}
    return {**arguments, **{k: v for k, v in chosen.items() if v is not None}, **overrides}
