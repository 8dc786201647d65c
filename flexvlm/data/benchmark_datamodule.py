"""A LightningDataModule over one evaluation benchmark (test and predict), with the protocol that
scores it (``flexvlm.evaluation``)."""

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader

from flexvlm.data.benchmarks import (
    BenchmarkDataset,
    BenchmarkItem,
    read_llava_questions,
    read_magnifierbench,
    read_rsvqa_hr,
    read_textvqa,
    read_vstar,
)
from flexvlm.data.datamodule import Triple, _VQADataModule
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, load_image, preprocess_image
from flexvlm.data.templates import ChatTemplate, VicunaV1Template
from flexvlm.data.tokenizer import load_tokenizer
from flexvlm.evaluation import EvaluationProtocol, GenerationVQA, LetterChoice, LikelihoodChoice, YesNo

Reader = Callable[..., list[BenchmarkItem]]

# name -> (its reader, the protocol docs/method.md section 8 scores it with)
BENCHMARKS: dict[str, tuple[Reader, type[EvaluationProtocol]]] = {
    "textvqa": (read_textvqa, GenerationVQA),
    "vstar": (read_vstar, LikelihoodChoice),
    "magnifierbench": (read_magnifierbench, LetterChoice),
    "rsvqa_hr": (read_rsvqa_hr, YesNo),
    "llava_questions": (read_llava_questions, GenerationVQA),
}


def load_preprocessed(path: str, size: int, mean: Triple, std: Triple) -> dict[str, Tensor]:
    """An image file as the collator wants it: ``image`` (3, size, size) and ``content_box``."""
    image, content_box = preprocess_image(load_image(path), size, mean, std)
    return {"image": image, "content_box": content_box}


class BenchmarkDataModule(_VQADataModule):
    """Test / predict dataloaders over a benchmark's items; prompts go through ``template``."""

    def __init__(
        self,
        benchmark: str,
        reader_args: dict[str, Any],
        tokenizer_path: str,
        template: ChatTemplate | None = None,
        protocol: EvaluationProtocol | None = None,
        image_size: int = 1008,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        """
        Args:
            benchmark: one of ``BENCHMARKS``.
            reader_args: keyword arguments of its reader in ``flexvlm.data.benchmarks`` (files and
                folders; e.g. ``split`` for rsvqa_hr).
            tokenizer_path: a folder (or file) for ``load_tokenizer``.
            template: the chat template (default: LLaVA-1.5's Vicuna v1).
            protocol: how answers are scored (default: the benchmark's own).
            image_size: the model's high-res input side (zoom x the backbone's side).
            limit: only the first ``limit`` questions (a quick check).
        """
        if benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}")
        reader, default_protocol = BENCHMARKS[benchmark]
        try:  # fail at construction, not after the model has been loaded
            inspect.signature(reader).bind(**reader_args)
        except TypeError as err:
            params = ", ".join(inspect.signature(reader).parameters)
            raise ValueError(f"reader_args of {benchmark!r}: {err}; {reader.__name__} takes {params}") from err
        super().__init__(load_tokenizer(tokenizer_path), template or VicunaV1Template(), eval_batch_size,
                         eval_batch_size, num_workers)
        self.save_hyperparameters(ignore=["template", "protocol"])
        self.read = partial(reader, **reader_args)
        self.protocol = protocol if protocol is not None else default_protocol()

    def _dataset(self, split: str) -> BenchmarkDataset | None:
        if split != "test":
            return None
        h = self.hparams
        loader = partial(load_preprocessed, size=h.image_size, mean=h.mean, std=h.std)
        return BenchmarkDataset(self.read()[: h.limit], loader)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        trainer = self.trainer
        if split not in self.splits or trainer is None or trainer.world_size == 1:
            return super()._loader(split, shuffle)
        # every question exactly once: Lightning's DistributedSampler would repeat some to even out the
        # shards, counting them twice in the scores
        sampler = UnrepeatedDistributedSampler(self.splits[split], num_replicas=trainer.world_size,
                                               rank=trainer.global_rank, shuffle=False)
        return DataLoader(self.splits[split], batch_size=self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=self.collator)
