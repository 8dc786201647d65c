"""A LightningDataModule over one evaluation benchmark (test and predict), with the protocol that
scores it (``flexvlm.evaluation``)."""

from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

from flexvlm.data.benchmarks import BenchmarkDataset, BenchmarkReader
from flexvlm.data.datamodule import _VQADataModule
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_IMAGE_PIXELS, load_image
from flexvlm.data.llava import Triple
from flexvlm.data.problems import BadSamplePolicy, Problem
from flexvlm.data.templates import ChatTemplate, VicunaV1Template
from flexvlm.data.tokenizer import load_tokenizer
from flexvlm.data.visuals import ImageProcessor, SquareImages
from flexvlm.evaluation import EvaluationProtocol


def load_processed(path: str, processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """An image file as the collator wants it: its entries as ``processor`` makes them."""
    return processor.process(load_image(path, max_pixels))


def load_preprocessed(path: str, size: int, mean: Triple, std: Triple,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """An image file as LLaVA-1.5 takes it: ``image`` (3, size, size) and ``content_box``."""
    return load_processed(path, SquareImages(size, mean, std), max_pixels)


class BenchmarkDataModule(_VQADataModule):
    """Test / predict dataloaders over a benchmark's items; prompts go through ``template``."""

    def __init__(
        self,
        benchmark: BenchmarkReader,
        tokenizer_path: str,
        template: ChatTemplate | None = None,
        protocol: EvaluationProtocol | None = None,
        image_size: int = 1008,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        on_bad_sample: BadSamplePolicy = "skip",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        """
        Args:
            benchmark: its reader (``flexvlm.data.benchmarks``: ``TextVQA``, ``VStar``,
                ``MagnifierBench``, ``RSVQAHR``, ``LlavaQuestions``, or any subclass of
                ``BenchmarkReader`` by class_path), with its files and folders.
            tokenizer_path: a folder (or file) for ``load_tokenizer``.
            template: the chat template (default: LLaVA-1.5's Vicuna v1).
            protocol: how answers are scored (default: the benchmark's own).
            image_size: the model's high-res input side (zoom x the backbone's side).
            limit: only the first ``limit`` questions (a quick check).
            on_bad_sample: ``skip`` (a question that cannot be asked is left out, recorded in the
                run's skipped.jsonl and answers.jsonl) or ``error`` (stop; at setup for the
                problems the reader finds).
            max_image_pixels: an image with more pixels is a bad sample, found from its header
                before it is decoded (default: Pillow's limit against decompression bombs).
        """
        super().__init__(load_tokenizer(tokenizer_path), template or VicunaV1Template(), eval_batch_size,
                         eval_batch_size, num_workers, on_bad_sample=on_bad_sample)
        self.save_hyperparameters(ignore=["benchmark", "template", "protocol"])
        self.benchmark = benchmark
        self.protocol = protocol if protocol is not None else benchmark.protocol()

    def read_split(self, split: str) -> BenchmarkDataset | None:
        if split != "test":
            return None
        h = self.hparams
        read, problems = self.benchmark.read()
        items = []
        for item in read[: h.limit]:
            if Path(item.image_path).is_file():
                items.append(item)
            else:
                problems.append(Problem(item.where, item.question_id, f"image not found: {item.image_path}",
                                        "add the file or fix the image folder"))
        processor = self.processor or SquareImages(h.image_size, h.mean, h.std)
        loader = partial(load_processed, processor=processor, max_pixels=h.max_image_pixels)
        return BenchmarkDataset(items, loader, problems)

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return super()._eval_sampler(dataset)
        # every question exactly once: Lightning's DistributedSampler would repeat some to even out the
        # shards, counting them twice in the scores
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)
