"""Pictures of where the model looked: the high-res regions each FA layer selected, over the image."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from flexvlm.constants import IMAGE_PLACEHOLDER
from flexvlm.evaluation import gather_records

PANEL = 192  # pixels per panel side
CAPTION = 14  # pixels of text above each row


def to_pil(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo the normalisation of a (3, S, S) tensor."""
    pixels = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def overlay(image: Image.Image, mask: Tensor) -> Image.Image:
    """Dim what was not selected and outline every selected high-res token."""
    grid = mask.shape[-1]
    base = image.resize((PANEL, PANEL), Image.NEAREST)
    dim = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.6)
    keep = Image.fromarray((mask.cpu().numpy().astype("uint8") * 255)).resize(base.size, Image.NEAREST)
    out = Image.composite(base, dim, keep)
    draw = ImageDraw.Draw(out)
    cell = PANEL / grid
    for r, c in mask.nonzero().tolist():
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 0, 255))
    return out


def selection_grid(rows: list[dict[str, Any]], mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """One row per image: the image, then one panel per FA layer. Each row is a dict with ``image``
    (3, S, S), ``masks`` {layer: (G, G) bool} and ``caption``."""
    layers = sorted({layer for row in rows for layer in row["masks"]})
    width, height = PANEL * (1 + len(layers)), (PANEL + CAPTION) * len(rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        top = i * (PANEL + CAPTION)
        image = to_pil(row["image"], mean, std)
        draw.text((2, top + 1), row["caption"], fill=(0, 0, 0))
        sheet.paste(image.resize((PANEL, PANEL), Image.NEAREST), (0, top + CAPTION))
        for j, layer in enumerate(layers):
            mask = row["masks"].get(layer)
            if mask is not None:
                sheet.paste(overlay(image, mask), (PANEL * (1 + j), top + CAPTION))
                draw.text((PANEL * (1 + j) + 2, top + 1), f"layer {layer}: {int(mask.sum())} tokens", fill=(0, 0, 0))
    return sheet


class SelectionPictures(L.Callback):
    """At the end of ``test``, writes ``selections.png`` into the run folder: the first
    ``num_images`` test images with the high-res tokens each FA layer selected for the answer."""

    def __init__(self, num_images: int = 8, filename: str = "selections.png") -> None:
        self.num_images, self.filename = num_images, filename
        self.rows: list[dict[str, Any]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs or not outputs["masks"]:
            return
        for i in range(len(outputs["answers"])):
            if len(self.rows) >= self.num_images:
                return
            question = batch["question"][i] if "question" in batch else ""
            caption = f"{question} -> {outputs['answers'][i]} (ref {batch['answers'][i][0]})"
            masks = {layer: m[i].cpu() for layer, m in outputs["masks"].items()}
            self.rows.append({"image": batch["images"][i].cpu(), "masks": masks, "caption": caption})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast from rank 0 in DDP: every process must ask for it
        if not self.rows or not trainer.is_global_zero or log_dir is None:
            return
        backbone = pl_module.model.encoder.backbone
        path = Path(log_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        selection_grid(self.rows, backbone.mean, backbone.std).save(path)
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
        backbone = pl_module.model.encoder.backbone
        for i, out in enumerate(outputs):
            name = re.sub(r"[^\w.-]", "_", str(out["question_id"])) + ".png"  # V* ids hold a "/"
            question = " ".join(out["prompt"].replace(IMAGE_PLACEHOLDER, "").split())  # one caption line
            caption = f"{question} -> {out['answer']}"
            row = {"image": batch["images"][i].cpu(), "masks": out["masks"], "caption": caption}
            selection_grid([row], backbone.mean, backbone.std).save(folder / name)
            record = {k: v for k, v in out.items() if k != "masks"}
            self.records.append(record | {"picture": f"{self.folder}/{name}"})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = gather_records(self.records)
        if not trainer.is_global_zero:
            return
        path = self.log_dir / "predictions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} predictions and pictures of the selected high-res regions in {path.parent}")
