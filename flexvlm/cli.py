"""``python -m flexvlm fit|validate|test|predict --config <yaml>``: LightningCLI with omegaconf
interpolation, the resolved config saved with each run, ``--test_after_fit`` for the main job,
``--threads`` to pin torch's CPU threads, error messages that name the valid keys when a config
has a typo, values that several parts must agree on linked from the model to their other users,
and checkpoints written atomically. ``python -m flexvlm check-data --config <yaml>`` checks the
configured data instead (``flexvlm.data.check``)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

import lightning as L
import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from flexvlm.lit_module import FlexVLMModule
from flexvlm.models.encoder import VisualEncoder
from flexvlm.models.vision import VisionBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.run_files import AtomicCheckpointIO, keep_log_before_resume, read_run_checkpoint

# values the model decides and their other users must agree on, from any YAML or the command line:
# the zoom, and what the backbone decides (the data's patch size, image size and normalisation, the
# width of the auxiliary objective's input); (attribute, target) pairs, a link skipped where the
# class configured lacks the target
MODEL = "model.model.init_args"
BACKBONE_LINKS = [
    ("patch_size", "data.init_args.patch_size"),
    ("mean", "data.init_args.mean"),
    ("std", "data.init_args.std"),
]


def _import_class(path: str) -> type:
    """The class a config names by its import path, e.g. ``flexvlm.models.vision.TimmBackbone``."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate_part(config: Namespace, base: type) -> Any:
    """One part of a parsed config (``class_path`` and ``init_args``), as ``base``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--part", type=base)
    return parser.instantiate_classes(parser.parse_object({"part": config.as_dict()})).part


def backbone_on_meta(spec: Namespace) -> VisionBackbone:
    """The backbone a config names, built on the meta device (no memory, no weights read), for the
    values it derives itself, e.g. a timm tower's patch size from its ``model_kwargs``."""
    init_args = {k: v for k, v in vars(spec.get("init_args") or Namespace()).items() if k != "checkpoint_path"}
    with torch.device("meta"):
        return _import_class(spec.class_path)(**init_args)


def _backbone_attribute(name: str) -> Callable[[Namespace | None, Namespace | None], Any]:
    """A data setting from the model's backbone; None for an architecture's encoder, whose image
    processor gives the data its geometry (``flexvlm.data.visuals``)."""
    return lambda backbone, encoder: None if backbone is None else getattr(backbone_on_meta(backbone), name)


def _feature_dim(backbone: Namespace | None, encoder: Namespace | None) -> int | None:
    """The width of the tower's features: an auxiliary objective's input."""
    if backbone is not None:
        return backbone_on_meta(backbone).embed_dim
    if encoder is None:
        return None
    with torch.device("meta"):
        return instantiate_part(encoder, VisualEncoder).feature_dim


def _high_res_size(zoom: int, backbone: Namespace | None) -> int | None:
    """The high-res image side the data must produce: zoom x the backbone's input side (None for an
    architecture's encoder, see ``_backbone_attribute``)."""
    return None if backbone is None else zoom * backbone_on_meta(backbone).image_size


def _valid_keys(parser: LightningArgumentParser, message: str) -> tuple[str, list[str]] | None:
    """For an unknown key in ``message``: the key and the valid names at its level."""
    option = re.search(r"Option '(\w+)' is not accepted", message)
    owner = re.search(r"class_path '([\w.]+)'", message)
    if option and owner:
        params = inspect.signature(_import_class(owner.group(1)).__init__).parameters
        return option.group(1), [p for p in params if p != "self" and not p.startswith("*")]
    # a key of a config file: "Group 'trainer' does not accept option 'max_stepz'" or, given after the
    # subcommand, "Subcommand 'fit' does not accept option 'trainer.max_stepz'"; of the command line:
    # "unrecognized arguments: --trainer.max_stepz"
    in_group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    in_subcommand = re.search(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)
    unknown = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if in_group:
        full = ".".join(in_group.groups())
    elif in_subcommand or unknown:
        full = (in_subcommand or unknown).group(1)
    else:
        return None
    parent, _, key = full.rpartition(".")
    prefix = parent + "." if parent else ""
    # a config file's keys are checked by the parser of the subcommand, whose error reaches the root's
    subcommands = parser._subcommands_action.choices.values() if parser._subcommands_action else []
    actions = [a for p in [parser, *subcommands] for a in p._actions]
    names = {a.dest[len(prefix):].split(".")[0] for a in actions if a.dest.startswith(prefix)}
    return key, sorted(n for n in names if n and n != "help")


class FlexVLMArgumentParser(LightningArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_step is a typo, not max_steps
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = _valid_keys(self, message)
        if found:
            key, valid = found
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message += f"\n  valid names here: {', '.join(valid)}{hint}"
        super().error(message, ex)


class RunConfigCallback(SaveConfigCallback):
    """Lightning's: the resolved config saved into the run folder at setup. A run that fails before
    it writes anything else (a refused setting, a folder without space) leaves no folder holding
    config.yaml alone, which a sweep or a person would take for a run: such a folder goes again."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._folder = Path(trainer.log_dir)  # known on every process by now: no collective when failing

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        folder = getattr(self, "_folder", None)
        if not trainer.is_global_zero or folder is None or "://" in str(folder) or not folder.is_dir():
            return
        if [p for p in folder.rglob("*") if not p.is_dir()] == [folder / self.config_filename]:
            shutil.rmtree(folder)


class StepBudgetProgressBar(RichProgressBar):
    """Lightning's rich progress bar, which reads "Epoch 0/-2" in a run bounded by ``max_steps`` alone
    (``max_epochs`` -1): there it names the step budget instead."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch} (of {self.trainer.max_steps} steps)':{len(self.validation_description)}}"


class FlexVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, evaluate the final weights on the test split")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="CPU threads of torch's operators (None: torch's default); results depend "
                                 "on it, as the order of floating-point sums does, so a reproducible run pins it")
        parser.add_argument("--empty_init", type=bool, default=False,
                            help="build the model on the meta device (no memory, no weights read); the "
                                 "LightningModule's configure_model gives it its tensors on the Trainer's device")
        parser.link_arguments(f"{MODEL}.zoom", "data.init_args.zoom")
        for attribute, target in BACKBONE_LINKS:
            parser.link_arguments((f"{MODEL}.backbone", f"{MODEL}.encoder"), target,
                                  compute_fn=_backbone_attribute(attribute))
        parser.link_arguments((f"{MODEL}.backbone", f"{MODEL}.encoder"), "model.aux_objective.init_args.embed_dim",
                              compute_fn=_feature_dim)
        parser.link_arguments((f"{MODEL}.zoom", f"{MODEL}.backbone"), "data.init_args.image_size",
                              compute_fn=_high_res_size)

    def _subcommand_config(self, config: Namespace) -> Namespace:
        """The part of ``config`` that this run's subcommand reads (all of it without one)."""
        return config[self.subcommand] if self.subcommand else config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # flexvlm's own programs (check-data, export, sweeps, lmms-eval) build the CLI from arguments of
        # their own beside a command line of their own: Lightning's warning about that is no mistake here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            super().parse_arguments(parser, args)
        # before LightningCLI reads the checkpoint's hyperparameters: a wrong file is named now, not
        # met as a bare EOFError of torch's
        subcommand = self.config.get("subcommand")  # self.subcommand is set after this call
        ckpt_path = (self.config[subcommand] if subcommand else self.config).get("ckpt_path")
        if _is_local_checkpoint(ckpt_path):
            read_run_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config(self.config)
        if config.get("threads") is not None:
            torch.set_num_threads(config.threads)
        if self.subcommand == "fit" and config.get("ckpt_path"):
            _resume_in_checkpoint_folder(config)

    def instantiate_classes(self) -> None:
        """LightningCLI's, except that with ``empty_init`` the model alone is built on the meta device
        (the data, the objective, the metrics and the callbacks keep real tensors); the config saved
        with the run stays the one given."""
        config = self.config
        if self._subcommand_config(config).get("empty_init"):
            config = config.clone()
            group = self._subcommand_config(config).model
            with torch.device("meta"):
                group.model = instantiate_part(group.model, FlexVLM)
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # unless the config says how to save
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        # Lightning's default bar is the rich one when rich is installed; the tqdm one reads well
        if type(trainer.progress_bar_callback) is RichProgressBar:
            trainer.callbacks = [StepBudgetProgressBar() if c is trainer.progress_bar_callback else c
                                 for c in trainer.callbacks]
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def _is_local_checkpoint(ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` names a local checkpoint file, not one of Lightning's keywords (``last``,
    ``best``, ...), a remote path, or a sharded checkpoint folder that its strategy reads."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or ckpt_path.lower().startswith("registry"):
        return False
    return "://" not in ckpt_path and not (Path(ckpt_path) / ".metadata").is_file()


def _resume_in_checkpoint_folder(config: Any) -> None:
    """A run resumed from ``<save_dir>/<name>/<version>/checkpoints/x.ckpt`` logs into that version
    folder, not a new one, when the logger's version is not set (``CSVLogger`` and the others that take
    ``save_dir``, ``name`` and ``version``); the log written there before the checkpoint's step is kept
    (``flexvlm.run_files.keep_log_before_resume``), before the logger starts its own."""
    logger = config.trainer.get("logger")
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if args is None or args.get("save_dir") is None or args.get("name") is None:
        return
    ckpt = Path(config.ckpt_path).resolve()
    run = Path(args.save_dir).resolve() / str(args.name)
    if args.get("version") is None and ckpt.parent.name == "checkpoints" and ckpt.parents[2] == run:
        args.version = ckpt.parents[1].name
    if args.get("version") is not None:
        version = args.version if isinstance(args.version, str) else f"version_{args.version}"
        rank_zero_only(keep_log_before_resume)(run / version, str(ckpt))


def build(cli_class: type[FlexVLMCLI], args: list[str] | None, run: bool) -> FlexVLMCLI:
    return cli_class(
        FlexVLMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_class=FlexVLMArgumentParser,
    )


def main(args: list[str] | None = None, run: bool = True) -> FlexVLMCLI:
    """The command line; ``run=False`` only builds the model, data and trainer from the configs."""
    return build(FlexVLMCLI, args, run)
