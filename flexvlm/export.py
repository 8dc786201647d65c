"""``python -m flexvlm export --ckpt <version>/checkpoints/last.ckpt --out <folder>``: a trained run in
its architecture's own format, which ``flexvlm.architectures.from_pretrained(<folder>)`` builds back into the same
model without flexvlm's configs, and other code reads as far as it knows the architecture.

The model is the run's: built on the meta device from the configs it was trained with (the
``config.yaml`` saved in its version folder, or ``--config`` as given to fit), its weights the
checkpoint's. Formats (of LLaVA-1.5, the only architecture today):

- ``release`` (the default): the authors' released FlexAttention checkpoint's layout, LLaVA-1.5's
  original one (``LlavaLlamaForCausalLM``: LLaMA's names, ``model.mm_projector.*``, ``mm_*`` keys in
  config.json) with W_K' / W_V' as ``self_attn.{k,v}_proj_hd`` in each FlexAttention layer and the
  method's settings in config.json's ``extra``; the CLIP tower, as the release's weights hold none,
  is a transformers ``CLIPVisionModel`` folder inside, which ``mm_vision_tower`` names.
- ``llava-hf``: transformers' ``LlavaForConditionalGeneration``, the tower included; W_K' / W_V' and
  ``extra`` ride along, unused by transformers.

``extra`` holds the release's own keys (what the authors' code reads: ``zoom_ratio``, ``threshold``...)
and, under ``flexvlm``, what they cannot say (the mode, N_SA, the selection as built, the margin
rule), which ``from_pretrained`` reads. The tower is written as OpenClipBackbone keeps it: the blocks
up to the one it reads, which is then the last (feature layer -1). Weights are safetensors (sharded
with transformers' index above 5 GB); the tokenizer files of the run's data are copied.

Parts that these formats cannot hold are refused, named (a tower other than open_clip's CLIP ViT,
e.g. the built-in task's PatchMLPBackbone): the run folder (config.yaml and the checkpoint) is what
shares such a model. The folder is written beside ``--out`` and takes its place only once the model
that ``from_pretrained`` builds from it has the run model's modules, tensor shapes and settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import Tensor, nn

from flexvlm.architectures.llava15 import (
    LLAVA_HF_LAYOUT, ORIGINAL_LLAVA_LAYOUT, arguments_from_llava, release_arguments,
)
from flexvlm.cli import FlexVLMCLI, build, instantiate_part
from flexvlm.models.clip import clip_vision_to_hf
from flexvlm.models.encoder import DualPathEncoder
from flexvlm.models.families import FAMILIES, family_of, llama_from_hf, llama_to_hf
from flexvlm.models.vision import OpenClipBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.run_files import read_run_checkpoint
from flexvlm.selection import SELECTION, AttentionSelection, RandomSelection, SelectionStrategy
from flexvlm.weights import put_parts, take_parts

__all__ = ["FORMATS", "export", "build_run_model", "main"]

FORMATS = ("release", "llava-hf")
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
TOWER_FOLDER = "vision_tower"  # the release layout's tower, which config.json names relative to the folder
FEATURE_LAYER = -1  # the tower holds the blocks up to the one the model reads
# the original LLaVA code's classes, by the model_type under which flexvlm reads their configs
_RELEASE_ARCHITECTURES = {"llava_llama": "LlavaLlamaForCausalLM", "llava_qwen": "LlavaQwenForCausalLM"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")
# the VLM's parts, by their names in FlexVLM's state dict
_PARTS = {"llm.": ("llm", ""), "projector.": ("projector", ""), "encoder.backbone.visual.": ("vision", "")}

StateDict = dict[str, Tensor]


# -- the run's model --------------------------------------------------------------------------------
class _RunModelCLI(FlexVLMCLI):
    """The run's configs and links; only the model is built, on the meta device: its architecture,
    since the checkpoint holds every weight (a tower's ``checkpoint_path`` is not read)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        # keys of fit's saved config.yaml that the parser without a subcommand lacks, unused here
        parser.add_argument("--ckpt_path", type=str | None, default=None)
        parser.add_argument("--weights_only", type=bool | None, default=None)

    def instantiate_classes(self) -> None:
        spec = self.config.model.model
        backbone = spec.init_args.get("backbone")
        if backbone is not None and (backbone.get("init_args") or {}).get("checkpoint_path"):
            backbone.init_args.checkpoint_path = None
        with torch.device("meta"):
            self.model = instantiate_part(spec, FlexVLM)
        self.tokenizer_path = self.config.data.init_args.get("tokenizer_path")


def _config_args(checkpoint: Path, configs: Sequence[str]) -> list[str]:
    """The command line of ``configs``, by default the run's saved config.yaml: <version>/config.yaml
    beside <version>/checkpoints/<name>.ckpt."""
    if not configs:
        saved = checkpoint.resolve().parent.parent / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"no config.yaml in {saved.parent}, the run folder of {checkpoint} (<version>/"
                                    f"checkpoints/<name>.ckpt): give the run's configs with --config, as to fit")
        configs = [str(saved)]
    return [arg for config in configs for arg in ("--config", str(config))]


def build_run_model(checkpoint: str | Path, configs: Sequence[str] = ()) -> tuple[FlexVLM, str | None]:
    """The model of a run's configs, on the meta device, and its data's tokenizer path (None: none)."""
    cli = build(_RunModelCLI, _config_args(Path(checkpoint), configs), run=False)
    return cli.model, cli.tokenizer_path


def _run_weights(lightning: dict[str, Any], model: FlexVLM, source: Path) -> StateDict:
    """The VLM's tensors of a Lightning checkpoint (the training-only rest dropped), which must be the
    model's."""
    state = {k.removeprefix("model."): v for k, v in lightning["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, assign=True)  # strict: the same names and shapes
    except RuntimeError as err:
        raise ValueError(f"{source} does not hold the weights of the model its config builds: {err}") from None
    return state


# -- what cannot be exported ----------------------------------------------------------------------------
def _projector_kind(projector: nn.Module) -> str:
    """The name ``build_projector`` builds it from."""
    if isinstance(projector, nn.Linear):
        return "linear"
    return f"mlp{sum(isinstance(m, nn.Linear) for m in projector)}x_gelu"


def _model_types(model: FlexVLM) -> tuple[str, ...]:
    """The config.json model_types of the decoder's family: transformers' first, LLaVA's own last."""
    return family_of(model.llm, "the run's model").model_types


def _refuse_what_has_no_place(model: FlexVLM, layout: str) -> None:
    if not isinstance(model.encoder, DualPathEncoder):
        raise ValueError(f"the {layout} format holds LLaVA-1.5's geometry; this model's {type(model.encoder).__name__} "
                         f"is another architecture's: its run folder (config.yaml and the checkpoint) is what shares it")
    backbone, llm = model.encoder.backbone, model.llm
    problems = []
    if not isinstance(backbone, OpenClipBackbone):
        problems.append(f"the vision tower {type(backbone).__name__}: the LLaVA formats hold a CLIP ViT as "
                        f"transformers' CLIPVisionModel, which flexvlm writes from open_clip's (OpenClipBackbone) only")
    entry = next((e for e in FAMILIES if type(llm) is e.model), None)
    if entry is None or entry.from_hf is not llama_from_hf:  # what the writer inverts (llama_to_hf)
        problems.append(f"the decoder {type(llm).__name__}: flexvlm writes the transformers families of "
                        f"flexvlm.models.families.FAMILIES that use LLaMA's tensor names")
    elif layout == "release" and entry.model_types[-1] not in _RELEASE_ARCHITECTURES:
        problems.append(f"the decoder {type(llm).__name__}: the original LLaVA code has classes for "
                        f"{', '.join(_RELEASE_ARCHITECTURES.values())} only (--format llava-hf holds it)")
    if model.reduction is not None:
        problems.append(f"the token reduction {model.reduction.describe()}: neither LLaVA format has a place for it")
    if layout == "llava-hf" and _projector_kind(model.projector) != "mlp2x_gelu":
        problems.append(f"the projector {_projector_kind(model.projector)}: llava-hf's is mlp2x_gelu "
                        f"(the release layout holds any)")
    if problems:
        raise ValueError(f"the {layout} format cannot hold this model:\n  " + "\n  ".join(problems) +
                         "\nits run folder (config.yaml and the checkpoint) is what shares it")


# -- config.json -------------------------------------------------------------------------------------
def _decoder_config(model: FlexVLM, model_type: str) -> dict[str, Any]:
    """The decoder's settings under transformers' names, as flexvlm.models.families reads them back; the
    activation is left to the family's transformers default, which is the one flexvlm implements."""
    config = model.config
    return {
        "model_type": model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps, "attention_bias": config.attention_bias,
        "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": config.tie_word_embeddings,
    }


def _clip_config(backbone: OpenClipBackbone) -> dict[str, Any]:
    """The tower as a transformers CLIPVisionConfig, every key written (llava-hf's defaults for absent
    keys are not CLIP's)."""
    visual = backbone.visual
    block = visual.transformer.resblocks[0]
    return {
        "model_type": "clip_vision_model", "hidden_size": visual.transformer.width,
        "intermediate_size": block.mlp.c_fc.out_features, "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": block.attn.num_heads, "image_size": backbone.image_size,
        "patch_size": backbone.patch_size, "num_channels": 3, "layer_norm_eps": visual.ln_pre.eps,
        "hidden_act": "quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
    }


def _selection_entry(selection: SelectionStrategy) -> dict[str, Any]:
    """The strategy by its registered name and the arguments it was built with (``extra.flexvlm``)."""
    name = next((n for n in SELECTION.names() if SELECTION.get(n) is type(selection)), None)
    if name is None:
        raise ValueError(f"the selection {type(selection).__name__} has no registered name, by which from_pretrained "
                         f"finds it: register it (@SELECTION.register or the flexvlm.selection entry point)")
    settings = selection.settings
    try:
        json.dumps(settings)
    except TypeError:
        raise ValueError(f"the selection {selection!r} has arguments that config.json cannot hold") from None
    return {"name": name, "settings": settings}


def _release_selection(selection: SelectionStrategy) -> dict[str, str]:
    """The release's keys for the selection, where it has them: `special: random`, or the attention
    rule's threshold (a whole number, as the release reads it)."""
    if isinstance(selection, RandomSelection):
        return {"special": "random"}
    threshold_rule = isinstance(selection, AttentionSelection) and selection.budget is None
    if threshold_rule and float(selection.threshold).is_integer():
        return {"threshold": str(int(selection.threshold))}
    return {}


def _extra(model: FlexVLM, hyper_parameters: dict) -> dict[str, Any]:
    """config.json's `extra`: the release's keys, as strings (only for flex: the release runs
    FlexAttention, and reads `extra`, when it names zoom_ratio), and flexvlm's settings."""
    encoder = model.encoder
    exported: dict[str, Any] = {"mode": model.mode, "num_sa_layers": model.num_sa_layers, "zoom": encoder.zoom,
                                "high_res_path": encoder.high_res_path, "margin_rule": model.margin_rule}
    if model.selection is None:
        return {"flexvlm": exported}
    exported["selection"] = _selection_entry(model.selection)
    size = encoder.backbone.image_size
    extra = {"zoom_ratio": str(encoder.zoom), "lowres_size": str(size), "highres_size": str(encoder.zoom * size),
             **_release_selection(model.selection)}
    warmup = hyper_parameters.get("alpha_warmup") or 0.0
    if warmup > 0:  # the release's a = min(1, warmup x progress): the fraction of training is its inverse
        extra["warmup"] = f"{1 / warmup:g}"
    return {**extra, "flexvlm": exported}


def _notes(model: FlexVLM, extra: dict, layout: str) -> list[str]:
    """What other code runs otherwise than the model (flexvlm.architectures.from_pretrained runs it as
    trained): transformers runs plain LLaVA; the authors' code what the release's keys of `extra` say."""
    if model.mode == "lr_only":
        return []
    if layout == "llava-hf" or model.mode != "flex":
        who = "transformers" if layout == "llava-hf" else "the authors' code"
        return [f"{who} runs this folder as plain LLaVA-1.5 (lr_only), not in {model.mode} mode"]
    release_keys = {k: v for k, v in extra.items() if k != "flexvlm"}
    implied = release_arguments(release_keys, model.encoder.backbone.image_size, "extra")
    actual = {"num_sa_layers": model.num_sa_layers, "zoom": model.encoder.zoom, "selection": model.selection,
              "margin_rule": model.margin_rule}
    return [f"the authors' code runs {key} {implied[key]!r}, the model {actual[key]!r}"
            for key in implied if repr(implied[key]) != repr(actual[key])]


# -- the two layouts ---------------------------------------------------------------------------------
@dataclass
class _Folder:
    config: dict[str, Any]
    weights: StateDict


def _parts(model: FlexVLM, weights: StateDict) -> dict[str, StateDict]:
    """The VLM's tensors by part under the names of the formats' own models (a tied head saved once)."""
    parts = take_parts(weights, _PARTS, "the run's model")
    if model.config.tie_word_embeddings:
        parts["llm"].pop("lm_head.weight", None)
    return {"llm": llama_to_hf(parts["llm"]), "projector": parts["projector"],
            "vision": clip_vision_to_hf(parts["vision"])}


def _release(model: FlexVLM, weights: StateDict, extra: dict) -> dict[str, _Folder]:
    layout, backbone = ORIGINAL_LLAVA_LAYOUT, model.encoder.backbone
    model_type = _model_types(model)[-1]
    parts = _parts(model, weights)
    tower = parts.pop("vision")
    config = {
        "architectures": [_RELEASE_ARCHITECTURES[model_type]], **_decoder_config(model, model_type),
        "torch_dtype": _dtype(weights, "llm."), "mm_vision_tower": TOWER_FOLDER, "mm_hidden_size": backbone.embed_dim,
        "mm_projector_type": _projector_kind(model.projector), layout.feature_layer_key: FEATURE_LAYER,
        layout.select_key: layout.patch_only, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "extra": extra,  # flexvlm pads every image to a square, as LLaVA-1.5's "pad"
    }
    tower_config = {"architectures": ["CLIPVisionModel"], **_clip_config(backbone),
                    "torch_dtype": _dtype(weights, "encoder.backbone.")}
    return {".": _Folder(config, put_parts(parts, layout.prefixes, layout.name)),
            TOWER_FOLDER: _Folder(tower_config, tower)}


def _llava_hf(model: FlexVLM, weights: StateDict, extra: dict, image_token_id: int | None) -> dict[str, _Folder]:
    layout, encoder = LLAVA_HF_LAYOUT, model.encoder
    vocab = model.config.vocab_size
    if image_token_id is None or not 0 <= image_token_id < vocab:
        raise ValueError(f"--format llava-hf needs --image_token_id in [0, {vocab}): llava-hf marks the image's place "
                         f"with a token of the vocabulary (llava-1.5-7b-hf: 32000 of 32064), whose embedding the "
                         f"image replaces; give one that no text encodes to (got {image_token_id})")
    model_type = _model_types(model)[0]
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "torch_dtype": _dtype(weights, "llm."), "text_config": _decoder_config(model, model_type),
        "vision_config": _clip_config(encoder.backbone),
        "image_token_index": image_token_id, "image_seq_length": encoder.lr_grid**2, "projector_hidden_act": "gelu",
        layout.feature_layer_key: FEATURE_LAYER, layout.select_key: layout.patch_only,
        "multimodal_projector_bias": True, "tie_word_embeddings": model.config.tie_word_embeddings, "extra": extra,
    }
    return {".": _Folder(config, put_parts(_parts(model, weights), layout.prefixes, layout.name))}


def _dtype(weights: StateDict, part: str) -> str:
    """config.json's torch_dtype: that of the part's first tensor (the decoder's embeddings, the tower's
    patch embedding)."""
    return str(next(v for k, v in weights.items() if k.startswith(part)).dtype).removeprefix("torch.")


# -- files ---------------------------------------------------------------------------------------------
def _save_weights(folder: Path, state: StateDict, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most ``max_shard_bytes`` (a larger tensor alone) and
    transformers' index, model.safetensors.index.json."""
    state = {k: v.contiguous() for k, v in state.items()}
    shards: list[StateDict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: Path, content: dict) -> None:
    file.write_text(json.dumps(content, indent=2) + "\n")


def _copy_tokenizer(path: str | None, folder: Path) -> None:
    """The run's tokenizer files (its data's tokenizer_path: a folder, or a tokenizer.json / .model
    file), where load_tokenizer and transformers look for them."""
    if path is None:  # e.g. the built-in task's word tokenizer
        return
    source = Path(path)
    if source.is_file():
        shutil.copy(source, folder / ("tokenizer.model" if source.suffix == ".model" else "tokenizer.json"))
    elif source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
    else:
        raise FileNotFoundError(f"the run's tokenizer {source} (data.init_args.tokenizer_path) is not there")


def _architecture(model: FlexVLM) -> dict[str, str]:
    """What decides a FlexVLM's outputs besides its weights, as text: modules (classes, sizes,
    activations, norms), tensor shapes, decoder settings, mode and selection, image geometry."""
    return {
        "modules": "\n".join(repr(child) for child in model.children()),
        "tensor shapes": "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()),
        # None for the head count of K / V or the head size means the derived value: compared resolved
        "decoder settings": repr(replace(model.config, num_kv_heads=model.config.kv_heads,
                                         head_size=model.config.head_dim)),
        "high-res attention": f"mode={model.mode} num_sa_layers={model.num_sa_layers} selection={model.selection!r} "
                              f"margin_rule={model.margin_rule}",
        "images": f"zoom={model.encoder.zoom} high_res_path={model.encoder.high_res_path}",
    }


def _check_rebuilds(folder: Path, model: FlexVLM) -> None:
    """flexvlm.architectures.from_pretrained(folder) builds the run's model (on the meta device: no
    weights read)."""
    with torch.device("meta"):
        rebuilt = FlexVLM(**arguments_from_llava(folder, pretrained=None))
    expected, found = _architecture(model), _architecture(rebuilt)
    problems = []
    for what in expected:
        if expected[what] != found[what]:
            run, exported = next((a, b) for a, b in zip_longest(expected[what].splitlines(), found[what].splitlines(),
                                                                  fillvalue="(nothing)") if a != b)
            problems.append(f"{what}: the run's {run.strip()!r}, the export's {exported.strip()!r}")
    if problems:
        raise ValueError("the exported folder would build another model than the run's, which this format cannot "
                         "hold:\n  " + "\n  ".join(problems))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty ({', '.join(held[:5])}): give another folder, or "
                              f"--overwrite to replace an earlier export")
    if held and not (out / "config.json").is_file():  # never delete a folder that is no export
        raise FileExistsError(f"--out {out} holds files but no config.json: --overwrite replaces an earlier export "
                              f"only; give another folder")


# -- the command -----------------------------------------------------------------------------------------
def export(
    checkpoint: str | Path,
    out: str | Path,
    configs: Sequence[str] = (),
    layout: str = "release",
    image_token_id: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Writes the run's ``checkpoint`` into ``out`` in ``layout`` (``FORMATS``); its model is built
    from ``configs`` (default: the run's saved config.yaml). ``image_token_id``: llava-hf's image
    token. Returns notes: what other code runs otherwise than the model (see ``_notes``)."""
    if layout not in FORMATS:
        raise ValueError(f"unknown format {layout!r}; valid: {', '.join(FORMATS)}")
    if image_token_id is not None and layout != "llava-hf":
        raise ValueError("--image_token_id is llava-hf's: the release layout marks the image as LLaVA does (-200)")
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out, overwrite)
    lightning = read_run_checkpoint(checkpoint)
    model, tokenizer_path = build_run_model(checkpoint, configs)
    _refuse_what_has_no_place(model, layout)
    weights = _run_weights(lightning, model, checkpoint)
    extra = _extra(model, lightning.get("hyper_parameters") or {})
    folders = _release(model, weights, extra) if layout == "release" else _llava_hf(model, weights, extra,
                                                                                      image_token_id)
    staging = out.with_name(f".{out.name}.exporting")  # beside it: a failed export leaves no half folder
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, folder in folders.items():
            (staging / name).mkdir(parents=True, exist_ok=True)
            _write_json(staging / name / "config.json", folder.config)
            _save_weights(staging / name, folder.weights, max_shard_bytes)
        _copy_tokenizer(tokenizer_path, staging)
        _check_rebuilds(staging, model)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return _notes(model, extra, layout)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexvlm export",
        description="Write a trained run in its architecture's own format, which "
                    "flexvlm.architectures.from_pretrained(<out>) loads back (README: Sharing a trained model).",
    )
    parser.add_argument("--ckpt", required=True,
                        help="the run's Lightning checkpoint, e.g. <version>/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    parser.add_argument("--config", action="append", default=[],
                        help="the run's configs, as given to fit, in order (default: <version>/config.yaml, "
                             "saved by the run)")
    parser.add_argument("--format", dest="layout", choices=FORMATS, default="release",
                        help="release: the authors' LLaVA-FlexAttn layout (default); llava-hf: transformers' LLaVA")
    parser.add_argument("--image_token_id", type=int, help="llava-hf: the vocabulary's token that marks the image")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    options = parser.parse_args(args)
    try:
        notes = export(options.ckpt, options.out, options.config, options.layout, options.image_token_id,
                       options.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"flexvlm export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {options.out} ({options.layout} format); "
          f"flexvlm.architectures.from_pretrained({str(options.out)!r}) loads it")
    for note in notes:
        print(f"note: {note}")
    return 0
