"""Pictures of where the model looked: the high-res regions each FA layer selected, over the image."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image, ImageDraw
from torch import Tensor

from flexvlm.constants import IMAGE_PLACEHOLDER
from flexvlm.data.visuals import SquareImages
from flexvlm.evaluation import gather_records

PANEL = 192  # pixels per panel side
CAPTION = 14  # pixels of text above each row


def overlay(image: Image.Image, mask: Tensor) -> Image.Image:
    """The image in a panel (its aspect kept), what was not selected dimmed, every selected high-res
    token of its (rows, cols) grid outlined."""
    base = _fitted(image)
    dim = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.6)
    if not mask.numel():  # no high-res tokens (an image that is its own only view)
        return dim
    keep = Image.fromarray((mask.cpu().numpy().astype("uint8") * 255)).resize(base.size, Image.NEAREST)
    out = Image.composite(base, dim, keep)
    draw = ImageDraw.Draw(out)
    cell_h, cell_w = base.height / mask.shape[0], base.width / mask.shape[1]
    for r, c in mask.nonzero().tolist():
        draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1], outline=(255, 0, 255))
    return out


def _fitted(image: Image.Image) -> Image.Image:
    """The image resized to fit a PANEL x PANEL square, aspect kept."""
    scale = PANEL / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)


def selection_grid(rows: list[dict[str, Any]]) -> Image.Image:
    """One row per image: the image, then one panel per FA layer. Each row is a dict with ``image``
    (a picture), ``masks`` {layer: (rows, cols) bool over the picture's high-res grid} and ``caption``."""
    layers = sorted({layer for row in rows for layer in row["masks"]})
    width, height = PANEL * (1 + len(layers)), (PANEL + CAPTION) * len(rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        top = i * (PANEL + CAPTION)
        image = row["image"]
        draw.text((2, top + 1), row["caption"], fill=(0, 0, 0))
        sheet.paste(_fitted(image), (0, top + CAPTION))
        for j, layer in enumerate(layers):
            mask = row["masks"].get(layer)
            if mask is not None:
                sheet.paste(overlay(image, mask), (PANEL * (1 + j), top + CAPTION))
                draw.text((PANEL * (1 + j) + 2, top + 1), f"layer {layer}: {int(mask.sum())} tokens", fill=(0, 0, 0))
    return sheet


def _pictures(trainer: L.Trainer, pl_module: L.LightningModule, images: Any) -> list[tuple[Image.Image, Any]]:
    """The batch's pictures through the data's image processor (LLaVA-1.5's squares by default)."""
    processor = getattr(trainer.datamodule, "processor", None) if trainer.datamodule is not None else None
    if processor is None:
        backbone = pl_module.model.encoder.backbone
        processor = SquareImages(pl_module.model.image_size, backbone.mean, backbone.std)
    return processor.pictures(images)


def _on_grid(mask: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """A (H, W) canvas mask cut to the sample's own (rows, cols) grid."""
    return mask if grid is None else mask[: grid[0], : grid[1]]


class SelectionPictures(L.Callback):
    """At the end of ``test``, writes ``selections.png`` into the run folder: the first
    ``num_images`` test images with the high-res tokens each FA layer selected for the answer."""

    def __init__(self, num_images: int = 8, filename: str = "selections.png") -> None:
        self.num_images, self.filename = num_images, filename
        self.rows: list[dict[str, Any]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs or not outputs["masks"] or len(self.rows) >= self.num_images:
            return
        pictures = _pictures(trainer, pl_module, batch["images"])
        for i in range(len(outputs["answers"])):
            if len(self.rows) >= self.num_images:
                return
            question = batch["question"][i] if "question" in batch else ""
            caption = f"{question} -> {outputs['answers'][i]} (ref {batch['answers'][i][0]})"
            picture, grid = pictures[i]
            masks = {layer: _on_grid(m[i].cpu(), grid) for layer, m in outputs["masks"].items()}
            self.rows.append({"image": picture, "masks": masks, "caption": caption})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast from rank 0 in DDP: every process must ask for it
        if not self.rows or not trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        selection_grid(self.rows).save(path)
        print(f"selected high-res regions drawn in {path}")


class PredictionPictures(L.Callback):
    """During ``predict``, writes into ``<run folder>/<folder>`` one PNG per image (the image, then
    one panel per FA layer with the high-res tokens selected at the prompt's end) and, beside the
    folder, ``predictions.jsonl`` (question_id, prompt, answer, hr_fraction, picture)."""

    def __init__(self, folder: str = "predictions") -> None:
        self.folder = folder
        self.records: list[dict[str, Any]] = []
        self.log_dir = Path(".")

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records = []
        # asked once here, where every process is: trainer.log_dir is a broadcast in DDP, and the
        # processes may run different numbers of batches
        self.log_dir = Path(trainer.log_dir)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        folder = self.log_dir / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        pictures = _pictures(trainer, pl_module, batch["images"])
        for i, out in enumerate(outputs):
            name = re.sub(r"[^\w.-]", "_", str(out["question_id"])) + ".png"  # V* ids hold a "/"
            question = " ".join(out["prompt"].replace(IMAGE_PLACEHOLDER, "").split())  # one caption line
            caption = f"{question} -> {out['answer']}"
            picture, grid = pictures[i]
            row = {"image": picture, "masks": {k: _on_grid(m, grid) for k, m in out["masks"].items()}, "caption": caption}
            selection_grid([row]).save(folder / name)
            record = {k: v for k, v in out.items() if k != "masks"}
            self.records.append(record | {"picture": f"{self.folder}/{name}"})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = gather_records(self.records)
        if not trainer.is_global_zero:
            return
        path = self.log_dir / "predictions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} predictions and pictures of the selected high-res regions in {path.parent}")
