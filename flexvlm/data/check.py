"""``python -m flexvlm check-data --config ...``: reads every sample of the configured splits (the
training set, a benchmark) before any work, and lists every problem in one report: entries left out
when the files are read (missing keys, empty or malformed conversations, roles, encoding errors,
missing images), images that do not decode or are degenerate, text that does not encode, that is
longer than the model's positions, and a tokenizer larger than the model's vocabulary. The exit
status is 1 if any sample cannot be used (an error), 0 if there are only warnings or nothing.

The model is built on the meta device from the same config, for its sizes only: no memory, no weights.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset

from flexvlm.cli import FlexVLMCLI, build, instantiate_part
from flexvlm.data.collate import SequenceCut, SequenceLimits, VQACollator
from flexvlm.data.datamodule import _VQADataModule, id_clashes
from flexvlm.data.image import has_alpha, open_image
from flexvlm.data.problems import BadSample, Problem
from flexvlm.data.visuals import ImageProcessor
from flexvlm.lit_module import sequence_limits
from flexvlm.models.vlm import FlexVLM


class SampleChecks(Dataset):
    """The problems of each sample of a dataset (one that can describe its samples: ``image_path``,
    ``text_sample``): its image opened and decoded (at most ``max_image_pixels``), its text encoded as
    the run would."""

    def __init__(self, dataset: Dataset, collator: VQACollator, max_image_pixels: int) -> None:
        self.dataset, self.collator, self.max_image_pixels = dataset, collator, max_image_pixels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> list[Problem]:
        sample = self.dataset.text_sample(index)
        where, sample_id = sample["where"], sample["question_id"]
        problems = []
        try:
            if has_alpha(open_image(self.dataset.image_path(index), self.max_image_pixels)):
                problems.append(Problem(where, sample_id, "the image has transparency, which is dropped (as LLaVA "
                                        "does): its transparent parts show whatever colour they store",
                                        "flatten it onto a background if that matters", severity="warning"))
        except (FileNotFoundError, ValueError) as err:
            problems.append(Problem(where, sample_id, str(err), "replace or remove the image"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.collator.encode(sample)
            except BadSample as bad:
                problems.append(bad.problem)
        return problems + [w.message.problem for w in caught if isinstance(w.message, SequenceCut)]


def check_splits(datamodule: _VQADataModule, limits: SequenceLimits, splits: tuple[str, ...] = ("train", "val", "test"),
                 processor: ImageProcessor | None = None) -> tuple[list[Problem], Counter]:
    """Every problem of the configured splits, and how many samples each split has; ``processor``:
    the model's own image pipeline, if its architecture has one."""
    problems, sizes = [], Counter()
    try:
        datamodule.fit_to_model(limits, processor)
    except ValueError as err:
        problems.append(Problem("data.init_args.tokenizer_path" if processor is None else "data", None, str(err)))
    for split in splits:
        dataset = datamodule.read_split(split)
        if dataset is None:
            continue
        found = list(getattr(dataset, "problems", []))  # the entries left out as the files were read
        sizes[split] = len(dataset) + len({p.where for p in found})
        if not hasattr(dataset, "text_sample"):
            print(f"{split}: {len(dataset)} generated samples, nothing to check")
            continue
        found += id_clashes(split, dataset)
        collator = VQACollator(datamodule.tokenizer, datamodule.template, limits=limits, generation=split != "train")
        checks = SampleChecks(dataset, collator, datamodule.hparams.max_image_pixels)
        loader = DataLoader(checks, batch_size=None, num_workers=datamodule.num_workers)
        for sample_problems in loader:
            found += sample_problems
        problems += found
    return problems, sizes


def report(problems: list[Problem], sizes: Counter) -> int:
    """Prints the problems, one a line, and a summary; the exit status (1: some sample is unusable)."""
    for problem in problems:
        print(f"{problem.severity:7s} {problem}")
    errors = sum(p.severity == "error" for p in problems)
    warned = len(problems) - errors
    checked = ", ".join(f"{split} {n}" for split, n in sizes.items())
    print(f"{errors} errors, {warned} warnings in {sum(sizes.values())} samples ({checked})")
    return 1 if errors else 0


class DataCheckCLI(FlexVLMCLI):
    """The run's own configs and links, but only the data is built, and the model's shape on the meta device."""

    def instantiate_classes(self) -> None:
        self.datamodule = instantiate_part(self.config.data, _VQADataModule)
        with torch.device("meta"):
            model = instantiate_part(self.config.model.model, FlexVLM)
        self.limits = sequence_limits(model, self.config.model.max_new_tokens)
        self.processor = model.encoder.image_processor(model.mode)


def main(args: list[str] | None = None) -> int:
    cli = build(DataCheckCLI, args, run=False)
    return report(*check_splits(cli.datamodule, cli.limits, processor=cli.processor))
