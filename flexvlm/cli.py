"""``python -m flexvlm fit|validate|test|predict --config <yaml>``: LightningCLI with omegaconf
interpolation, the resolved config saved with each run, ``--test_after_fit`` for the main job,
``--threads`` to pin torch's CPU threads, and error messages that name the valid keys when a config
has a typo."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import NoReturn

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flexvlm.lit_module import FlexVLMModule


def _valid_keys(parser: LightningArgumentParser, message: str) -> tuple[str, list[str]] | None:
    """For an unknown key in ``message``: the key and the valid names at its level."""
    option = re.search(r"Option '(\w+)' is not accepted", message)
    owner = re.search(r"class_path '([\w.]+)'", message)
    if option and owner:
        module, _, name = owner.group(1).rpartition(".")
        params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
        return option.group(1), [p for p in params if p != "self" and not p.startswith("*")]
    unknown = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if unknown:
        key = unknown.group(1)
        parent = key.rpartition(".")[0]
        prefix = parent + "." if parent else ""
        names = {a.dest[len(prefix):].split(".")[0] for a in parser._actions if a.dest.startswith(prefix)}
        return key.rpartition(".")[2], sorted(n for n in names if n and n != "help")
    return None


class _ArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = _valid_keys(self, message)
        if found:
            key, valid = found
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message += f"\n  valid names here: {', '.join(valid)}{hint}"
        super().error(message, ex)


class FlexVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, evaluate the final weights on the test split")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="CPU threads of torch's operators (None: torch's default); results depend "
                                 "on it, as the order of floating-point sums does, so a reproducible run pins it")

    def before_instantiate_classes(self) -> None:
        threads = self.config[self.subcommand].get("threads") if self.subcommand else self.config.get("threads")
        if threads is not None:
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None, run: bool = True) -> FlexVLMCLI:
    """The command line; ``run=False`` only builds the model, data and trainer from the configs."""
    return FlexVLMCLI(
        FlexVLMModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_class=_ArgumentParser,
    )
