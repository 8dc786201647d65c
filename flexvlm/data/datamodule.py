"""LightningDataModules: the two built-in synthetic tasks and LLaVA-format instruction data."""

from collections.abc import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from flexvlm.data import regions
from flexvlm.data.collate import SequenceLimits, VQACollator
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_IMAGE_PIXELS
from flexvlm.data.llava import LlavaInstructDataset, Triple
from flexvlm.data.problems import (
    BadSamplePolicy,
    Problem,
    SkipBadSamples,
    check_policy,
    problem_list,
    raise_if_any,
    shared_ids,
)
from flexvlm.data.sampler import ResumableDataLoader, ResumableSampler
from flexvlm.data.synthetic import COLOUR_NAMES, WORDS, SyntheticVQA
from flexvlm.data.templates import ChatTemplate, PlainTemplate, VicunaV1Template
from flexvlm.data.tokenizer import Tokenizer, WordTokenizer, load_tokenizer
from flexvlm.data.visuals import ImageProcessor

# which splits each Lightning stage needs (predict runs on the test split)
STAGE_SPLITS = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
    None: ("train", "val", "test"),
}

# The split whose answers are kept by question id (answers.jsonl; a restarted test leaves out the ids it
# has answered): of two questions with one id, one would be lost. Elsewhere an id only names a sample in
# messages, beside its file and entry (LLaVA-style training sets share ids between conversations).
ANSWERS_BY_ID = ("test",)


def id_clashes(split: str, dataset: Dataset) -> list[Problem]:
    """The samples whose id an earlier sample of the split has: errors where answers are kept by id,
    warnings elsewhere. Generated datasets (no ``text_sample``) number their samples: none."""
    if not hasattr(dataset, "text_sample"):
        return []
    samples = (dataset.text_sample(i) for i in range(len(dataset)))
    places = ((sample["where"], sample["question_id"]) for sample in samples)
    if split in ANSWERS_BY_ID:
        return shared_ids(places, "error", "answers are kept by question id, so one of the two would be lost: "
                                           "give each question an id of its own")
    return shared_ids(places, "warning", "both are used")


class _VQADataModule(L.LightningDataModule):
    """Dataloaders over train / val / test splits with the VQACollator; subclasses say how a
    split's dataset is read (`read_split`, None when the split is not configured).

    Bad samples (``on_bad_sample``): a split's dataset may list, in ``problems``, the entries it
    left out when it was read; ``error`` turns them into an error at setup, ``skip`` keeps them in
    ``self.problems`` for the run to record. A sample that fails later (an image that does not
    decode, a conversation that does not encode) stops the run under ``error``; under ``skip`` it is
    left out of its batch, listed in the batch's ``skipped``.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, batch_size: int,
        eval_batch_size: int | None, num_workers: int, seed: int = 0, on_bad_sample: BadSamplePolicy = "skip",
    ) -> None:
        super().__init__()
        check_policy(on_bad_sample)
        self.tokenizer, self.template = tokenizer, template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        # raises on a bad sample: for the protocols' own batches (flexvlm.evaluation)
        self.collator = VQACollator(tokenizer, template)
        self.limits: SequenceLimits | None = None
        self.processor: ImageProcessor | None = None  # a model's own image pipeline (fit_to_model)
        self.splits: dict[str, Dataset] = {}
        self.requested: set[str] = set()  # the splits a stage has asked for
        self.problems: dict[str, list[Problem]] = {}
        self.answered: Callable[[], set[str]] | None = None
        self.seed = seed

    def read_split(self, split: str) -> Dataset | None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.requested.update(STAGE_SPLITS[stage])
        for split in STAGE_SPLITS[stage]:
            if split not in self.splits and (dataset := self.read_split(split)) is not None:
                if split in ANSWERS_BY_ID and (clashes := id_clashes(split, dataset)):
                    raise ValueError(f"the {split} split has {len(clashes)} questions with the id of an earlier one "
                                     f"(whatever on_bad_sample is):\n{problem_list(clashes)}")
                problems = getattr(dataset, "problems", [])
                if self.on_bad_sample == "error":
                    raise_if_any(problems, f"the {split} split")
                if problems:
                    rank_zero_warn(f"the {split} split leaves out {len(problems)} bad samples "
                                   f"(on_bad_sample: skip):\n{problem_list(problems)}")
                self.problems[split] = problems
                self.splits[split] = dataset

    def fit_to_model(self, limits: SequenceLimits, processor: ImageProcessor | None = None) -> None:
        """What the model takes, from here on: sequences are cut to it, prompts checked against it;
        ``processor``: the model's own image pipeline, for an architecture whose preprocessing is
        its own (None: LLaVA-1.5's square images, this datamodule's)."""
        if processor is not None:
            self.use_processor(processor)
        if self.tokenizer.vocab_size > limits.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids, the model's embedding {limits.vocab_size}: "
                "ids beyond it would index past the embedding. Use the model's tokenizer "
                "(data.init_args.tokenizer_path), or a model whose vocabulary covers it "
                "(model.model.init_args.llm_overrides.vocab_size)")
        self.limits = self.collator.limits = limits

    def use_processor(self, processor: ImageProcessor) -> None:
        """Images go through ``processor`` from here on: the splits asked for are read again with it, and a
        word-level vocabulary learns the words its prompts put around the image (after its own, so that
        no id moves; a model's own tokenizer has them)."""
        self.processor = self.collator.processor = processor
        self.splits = {split: dataset for split in sorted(self.requested)
                       if (dataset := self.read_split(split)) is not None}
        if isinstance(self.tokenizer, WordTokenizer):
            self.tokenizer = self.collator.tokenizer = self.tokenizer.with_words(list(processor.special_tokens))

    def skip_answered(self, answered: Callable[[], set[str]]) -> None:
        """The test loader leaves out the questions a restarted test has answered: ``answered()``,
        asked when the loader is made (by then a checkpoint's weights are loaded)."""
        self.answered = answered

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        return None  # Lightning's own

    def _samples_done(self) -> int:
        """How far the training epoch stands, in samples (a checkpoint saves it)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready * self.batch_size

    def _loader(self, split: str, shuffle: bool, leave_out: set[str] | None = None) -> DataLoader | list:
        if split not in self.splits:
            return []  # Lightning skips a loop whose dataloader list is empty
        dataset = self.splits[split]
        if leave_out:
            dataset = Subset(dataset, [i for i, q in enumerate(dataset.sample_ids()) if q not in leave_out])
        skip = self.on_bad_sample == "skip"
        collator = VQACollator(self.tokenizer, self.template, limits=self.limits, skip_bad=skip,
                               generation=not shuffle, processor=self.processor)
        kwargs = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collator)
        dataset = SkipBadSamples(dataset) if skip else dataset
        if shuffle:
            return ResumableDataLoader(dataset, ResumableSampler(len(dataset), self.seed), self._samples_done,
                                       batch_size=self.batch_size, **kwargs)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=self._eval_sampler(dataset), **kwargs)

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False, leave_out=self.answered() if self.answered else None)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)


class _GeneratedVQADataModule(_VQADataModule):
    """A built-in generated task (its ``dataset``), PlainTemplate, its word-level vocabulary, its scenes
    drawn to the model's geometry.

    LLaVA-1.5's geometry (the config links it from the model's backbone): square scenes of
    ``image_size`` pixels, a token per ``patch_size`` pixels, a low-res cell per ``zoom`` x ``zoom``
    tokens. An architecture whose preprocessing cuts images into square views (its encoder's
    image processor, given at ``fit_to_model``) gets scenes of ``views`` (rows, cols) of them
    instead: (rows x view side) x (cols x view side) pixels, a token per view pixel side / view
    tokens, a low-res cell (a token of the view squeezed from the whole image) per rows x cols tokens.

    ``seed`` draws every split's samples; ``shuffle_seed`` (default: ``seed``) the training order
    alone, so runs of one study can vary their order on the same data and test split."""

    def __init__(self, words: list[str], sizes: dict[str, int], seed: int, shuffle_seed: int | None,
                 batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
        order_seed = seed if shuffle_seed is None else shuffle_seed
        super().__init__(WordTokenizer(words), PlainTemplate(), batch_size, eval_batch_size, num_workers, order_seed)
        self.sizes = sizes

    def dataset(self, split: str, geometry: dict) -> Dataset:
        """The split's samples, drawn to ``geometry`` (image_size, patch_size, zoom)."""
        raise NotImplementedError

    def geometry(self) -> dict | None:
        """The scenes' image_size, patch_size and zoom, from the model's processor or the linked
        settings; None until the model's processor gives them."""
        h = self.hparams
        if self.processor is not None:
            if self.processor.view_size is None:
                raise ValueError(f"{type(self.processor).__name__} draws no square views: the built-in task cannot "
                                 f"size its scenes for it")
            rows, cols = h.views
            size, tokens = self.processor.view_size, self.processor.view_tokens
            if size % tokens:
                raise ValueError(f"{type(self.processor).__name__}'s views of {size} px hold {tokens} x {tokens} tokens, "
                                 f"no whole number of pixels a token: the built-in task cannot draw its tiles on them")
            return dict(image_size=(rows * size, cols * size), patch_size=size // tokens, zoom=(rows, cols))
        if h.image_size is None:
            return None  # the model's processor gives the geometry (fit_to_model)
        return dict(image_size=h.image_size, patch_size=h.patch_size, zoom=h.zoom)

    def read_split(self, split: str) -> Dataset | None:
        geometry = self.geometry()
        return None if geometry is None else self.dataset(split, geometry)


class SyntheticVQADataModule(_GeneratedVQADataModule):
    """The built-in synthetic high-res VQA task (flexvlm.data.synthetic); geometry and seeds as
    ``_GeneratedVQADataModule``'s."""

    colour_classes = len(COLOUR_NAMES) + 1  # its colour targets' classes, background included

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int | None = 96,
        zoom: int = 3,
        patch_size: int | None = 8,
        fine_print: bool = False,
        mean: Triple | None = (0.5, 0.5, 0.5),
        std: Triple | None = (0.5, 0.5, 0.5),
        shuffle_seed: int | None = None,
        views: tuple[int, int] = (2, 3),
    ) -> None:
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        super().__init__(WORDS, sizes, seed, shuffle_seed, batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()

    def dataset(self, split: str, geometry: dict) -> SyntheticVQA:
        h = self.hparams
        return SyntheticVQA(self.sizes[split], h.seed, split=split, mean=h.mean, std=h.std, fine_print=h.fine_print,
                            processor=self.processor, **geometry)


class RegionsVQADataModule(_GeneratedVQADataModule):
    """The second built-in task, several regions a question (flexvlm.data.regions, docs/regions-task.md);
    geometry and seeds as ``_GeneratedVQADataModule``'s. ``num_colours``: how many of its colours the
    scenes use. The model's ``max_new_tokens`` must cover an answer's 3 colour words, 3 digits and its
    end token."""

    colour_classes = regions.COLOUR_CLASSES

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int | None = 192,
        zoom: int = 3,
        patch_size: int | None = 8,
        num_colours: int = len(regions.COLOUR_NAMES),
        mean: Triple | None = (0.5, 0.5, 0.5),
        std: Triple | None = (0.5, 0.5, 0.5),
        shuffle_seed: int | None = None,
        views: tuple[int, int] = (2, 3),
    ) -> None:
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        super().__init__(regions.WORDS, sizes, seed, shuffle_seed, batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()

    def fit_to_model(self, limits: SequenceLimits, processor: ImageProcessor | None = None) -> None:
        generated = limits.max_length - limits.max_prompt_length  # the model's max_new_tokens
        if generated < regions.ANSWER_ROWS:
            raise ValueError(f"the model generates at most {generated} tokens an answer (model.max_new_tokens), the "
                             f"regions task's answers take {regions.ANSWER_ROWS} (up to {regions.MAX_READ} colour words, "
                             f"as many digits and the end token): set model.max_new_tokens to {regions.ANSWER_ROWS} "
                             "(experiments/regions/task.yaml does)")
        super().fit_to_model(limits, processor)

    def dataset(self, split: str, geometry: dict) -> regions.RegionsVQA:
        h = self.hparams
        return regions.RegionsVQA(self.sizes[split], h.seed, split=split, num_colours=h.num_colours, mean=h.mean,
                                  std=h.std, processor=self.processor, **geometry)


class LlavaDataModule(_VQADataModule):
    """LLaVA-format JSON + image folder, a HF tokenizer and a chat template (default Vicuna v1)."""

    def __init__(
        self,
        train_json: str,
        image_folder: str,
        tokenizer_path: str,
        val_json: str | None = None,
        test_json: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 1008,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
        template: ChatTemplate | None = None,
        seed: int = 0,
        on_bad_sample: BadSamplePolicy = "skip",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        """``on_bad_sample``: ``skip`` (leave a bad sample out, recorded in the run's skipped.jsonl)
        or ``error`` (stop, at setup for the problems found when the files are read).
        ``max_image_pixels``: an image with more pixels is a bad sample, found from its header before
        it is decoded (default: Pillow's limit against decompression bombs)."""
        template = template or VicunaV1Template()
        super().__init__(load_tokenizer(tokenizer_path), template, batch_size, eval_batch_size, num_workers, seed,
                         on_bad_sample)
        self.save_hyperparameters(ignore=["template"])
        self.files = {"train": train_json, "val": val_json, "test": test_json}

    def read_split(self, split: str) -> LlavaInstructDataset | None:
        if self.files[split] is None:
            return None
        h = self.hparams
        return LlavaInstructDataset(self.files[split], h.image_folder, h.image_size, h.mean, h.std, h.max_image_pixels,
                                    self.processor)
