"""``python -m flexvlm fit|validate|test|predict --config <yaml>``: LightningCLI with omegaconf
interpolation, the resolved config saved with each run, and ``--test_after_fit`` for the main job."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from flexvlm.lit_module import FlexVLMModule


class FlexVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, evaluate the final weights on the test split")

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
    )
