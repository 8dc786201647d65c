"""LightningDataModules: the built-in synthetic task and LLaVA-format instruction data."""

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from flexvlm.data.collate import VQACollator
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, load_image, preprocess_image
from flexvlm.data.sampler import ResumableSampler
from flexvlm.data.synthetic import WORDS, SyntheticVQA
from flexvlm.data.templates import ChatTemplate, PlainTemplate, VicunaV1Template
from flexvlm.data.tokenizer import Tokenizer, WordTokenizer, load_tokenizer

Triple = tuple[float, float, float]


class LlavaInstructDataset(Dataset):
    """A LLaVA-format JSON list of `{"id", "image", "conversations"}`; images only for now."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        image_size: int,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
    ) -> None:
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {json_path}")
        self.entries = json.loads(json_path.read_text())
        missing = [str(e.get("id", i)) for i, e in enumerate(self.entries) if not e.get("image")]
        if missing:
            raise ValueError(
                f"{json_path}: {len(missing)} entries have no image (first ids: {missing[:5]}); "
                "text-only samples are not supported"
            )
        self.image_folder = Path(image_folder)
        self.image_size, self.mean, self.std = image_size, mean, std

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image = load_image(self.image_folder / entry["image"])
        tensor, content_box = preprocess_image(image, self.image_size, self.mean, self.std)
        return {
            "image": tensor,
            "content_box": content_box,
            "conversations": entry["conversations"],
            "question_id": str(entry.get("id", index)),
        }


# which splits each Lightning stage needs (predict runs on the test split)
STAGE_SPLITS = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
    None: ("train", "val", "test"),
}


class _VQADataModule(L.LightningDataModule):
    """Dataloaders over train / val / test splits with the VQACollator; subclasses say how a
    split's dataset is made (`_dataset`, None when the split is not configured)."""

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, batch_size: int,
        eval_batch_size: int | None, num_workers: int, seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer, self.template = tokenizer, template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.collator = VQACollator(tokenizer, template)
        self.splits: dict[str, Dataset] = {}
        self.seed = seed
        self.train_sampler: ResumableSampler | None = None
        self._resume_state: dict | None = None

    def _dataset(self, split: str) -> Dataset | None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS[stage]:
            if split not in self.splits and (dataset := self._dataset(split)) is not None:
                self.splits[split] = dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self.splits:
            return []  # Lightning skips a loop whose dataloader list is empty
        sampler = None
        if shuffle:
            sampler = self.train_sampler = ResumableSampler(len(self.splits[split]), self.seed)
            if self._resume_state is not None:
                sampler.resume(**self._resume_state)
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collator,
        )

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where the training epoch stood, in samples."""
        if self.trainer is None or self.train_sampler is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"epoch": self.trainer.current_epoch, "samples_done": done * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = state or None

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)


class SyntheticVQADataModule(_VQADataModule):
    """The built-in synthetic high-res VQA task (flexvlm.data.synthetic), PlainTemplate."""

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 96,
        zoom: int = 3,
        patch_size: int = 8,
        fine_print: bool = False,
        mean: Triple = (0.5, 0.5, 0.5),
        std: Triple = (0.5, 0.5, 0.5),
        shuffle_seed: int | None = None,
    ) -> None:
        """``seed`` draws every split's samples; ``shuffle_seed`` (default: ``seed``) the training
        order alone, so runs of one study can vary their order on the same data and test split."""
        order_seed = seed if shuffle_seed is None else shuffle_seed
        super().__init__(WordTokenizer(WORDS), PlainTemplate(), batch_size, eval_batch_size, num_workers, order_seed)
        self.save_hyperparameters()
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}

    def _dataset(self, split: str) -> SyntheticVQA:
        h = self.hparams
        return SyntheticVQA(
            self.sizes[split], h.seed, image_size=h.image_size, patch_size=h.patch_size,
            zoom=h.zoom, split=split, mean=h.mean, std=h.std, fine_print=h.fine_print,
        )


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
    ) -> None:
        template = template or VicunaV1Template()
        super().__init__(load_tokenizer(tokenizer_path), template, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters(ignore=["template"])
        self.files = {"train": train_json, "val": val_json, "test": test_json}

    def _dataset(self, split: str) -> LlavaInstructDataset | None:
        if self.files[split] is None:
            return None
        h = self.hparams
        return LlavaInstructDataset(self.files[split], h.image_folder, h.image_size, h.mean, h.std)
