"""DataModules: setup per stage, dataloaders and batch shapes, a one-step Lightning fit."""

import json

import lightning as L
import numpy as np
import torch
from PIL import Image

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.datamodule import LlavaDataModule, SyntheticVQADataModule
from flexvlm.data.synthetic import WORDS
from flexvlm.data.templates import PlainTemplate, VicunaV1Template
from flexvlm.data.tokenizer import HFTokenizer, WordTokenizer

from test_data_tokenizer import write_hf_tokenizer


def test_synthetic_datamodule_batches():
    dm = SyntheticVQADataModule(num_train=24, num_val=10, num_test=12, batch_size=8, eval_batch_size=5)
    assert isinstance(dm.tokenizer, WordTokenizer) and dm.tokenizer.vocab_size == 4 + len(WORDS)
    assert isinstance(dm.template, PlainTemplate)
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 96, 96)
    # [<image>, colour] then [digit, </s>]: one supervised digit per row
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 4)
    assert (batch["input_ids"][:, 0] == IMAGE_TOKEN_INDEX).all()
    assert batch["prompt_ids"].shape == (8, 2) and batch["prompt_mask"].all()
    digits = batch["labels"][:, 2].tolist()
    assert [dm.tokenizer.decode([d]) for d in digits] == [a[0] for a in batch["answers"]]
    assert (batch["labels"][:, :2] == IGNORE_INDEX).all()
    assert (batch["labels"][:, 3] == dm.tokenizer.eos_id).all()
    assert batch["aux_lr_colour"].shape == (8, 16)
    assert batch["aux_hr_colour"].shape == batch["aux_hr_digit"].shape == (8, 144)
    val = list(dm.val_dataloader())
    assert [len(b["question_id"]) for b in val] == [5, 5]

    dm.setup("predict")
    test_ids = [q for b in dm.predict_dataloader() for q in b["question_id"]]
    assert len(test_ids) == 12
    assert test_ids == [q for b in dm.test_dataloader() for q in b["question_id"]]
    train_ids = {q for b in dm.train_dataloader() for q in b["question_id"]}
    assert len(train_ids) == 24 and not train_ids & set(test_ids)


def test_shuffle_seed_changes_the_training_order_only():
    def splits(**kwargs):
        dm = SyntheticVQADataModule(num_train=24, num_val=4, num_test=6, batch_size=24, **kwargs)
        dm.setup(None)
        order = next(iter(dm.train_dataloader()))["question_id"]
        return order, [q for b in dm.test_dataloader() for q in b["question_id"]], dm.splits["test"][0]["image"]

    order, test_ids, image = splits()
    assert splits(shuffle_seed=0)[0] == order  # the default: the data seed
    other, other_test, other_image = splits(shuffle_seed=1)
    assert other != order and sorted(other) == sorted(order)  # the same samples, another order
    assert other_test == test_ids and torch.equal(other_image, image)


def write_llava_dir(root):
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (20 + 10 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
    entries = [
        {
            "id": i,
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the colour of the sky?"},
                {"from": "gpt", "value": "It is blue"},
            ],
        }
        for i in range(3)
    ]
    (root / "train.json").write_text(json.dumps(entries))
    (root / "test.json").write_text(json.dumps(entries[:2]))
    write_hf_tokenizer(root / "tok")


def test_llava_datamodule_batches(tmp_path):
    write_llava_dir(tmp_path)
    dm = LlavaDataModule(
        str(tmp_path / "train.json"), str(tmp_path / "img"), str(tmp_path / "tok"),
        test_json=str(tmp_path / "test.json"), batch_size=3, image_size=28,
    )
    assert isinstance(dm.tokenizer, HFTokenizer) and isinstance(dm.template, VicunaV1Template)
    dm.setup("fit")
    assert dm.val_dataloader() == []  # no val_json: Lightning skips validation
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (3, 3, 28, 28)
    assert batch["input_ids"][:, 0].tolist() == [dm.tokenizer.bos_id] * 3
    assert ((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1) == 1).all()
    labels = batch["labels"].tolist()
    supervised = [dm.tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in labels]
    assert supervised == ["It is blue"] * 3
    assert sorted(batch["content_box"][:, 0].tolist()) == [0.0, 0.125, 0.25]  # heights 40, 30, 20
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 2


class _ImageMean(L.LightningModule):
    """A stand-in model: enough for Lightning to drive the dataloaders."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, _):
        return (self.scale * batch["images"].mean()) ** 2

    def validation_step(self, batch, _):
        raise AssertionError("there is no val split to run")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_runs_without_val_split(tmp_path):
    write_llava_dir(tmp_path)
    dm = LlavaDataModule(str(tmp_path / "train.json"), str(tmp_path / "img"), str(tmp_path / "tok"),
                         batch_size=2, image_size=16)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_ImageMean(), datamodule=dm)
    assert trainer.global_step == 1
