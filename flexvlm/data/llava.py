"""LLaVA-format instruction data: a JSON list of ``{"id", "image", "conversations"}`` and an image
folder. Entries are checked when the file is read (structure, roles, text, that the image file
exists); the rest (decoding the image, its size) when a sample is loaded."""

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from flexvlm.data.files import read_json
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_IMAGE_PIXELS, load_image
from flexvlm.data.problems import BadSample, Problem
from flexvlm.data.templates import conversation_defect
from flexvlm.data.visuals import ImageProcessor, SquareImages

Triple = tuple[float, float, float]


def entry_problems(entry: Any, where: str, image_folder: Path) -> list[Problem]:
    """What is wrong with one entry of a LLaVA-format file, found without loading its image."""
    if not isinstance(entry, dict):
        return [Problem(where, None, f"expected a JSON object, got {type(entry).__name__}", "fix the entry")]
    sample_id = str(entry["id"]) if "id" in entry else None
    problems = []
    image = entry.get("image")
    if image is None:
        problems.append(Problem(where, sample_id, "no 'image': text-only samples are not supported",
                                "give it an image or remove the entry"))
    elif not isinstance(image, str):
        problems.append(Problem(where, sample_id, f"'image' must be one file name, got {image!r:.80}",
                                "one image a sample is supported"))
    elif not (image_folder / image).is_file():
        problems.append(Problem(where, sample_id, f"image not found: {image_folder / image}",
                                "add the file, or fix the path (relative to data.init_args.image_folder)"))
    defect = conversation_defect(entry.get("conversations"))
    if defect:
        problems.append(Problem(where, sample_id, defect, "fix or remove the entry"))
    return problems


class LlavaInstructDataset(Dataset):
    """The usable entries of a LLaVA-format file; ``problems`` lists those left out."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        image_size: int,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        processor: ImageProcessor | None = None,
    ) -> None:
        """``processor``: what an image becomes (default LLaVA-1.5's square of ``image_size``, ``mean``,
        ``std``; a model's own, ``flexvlm.data.visuals``)."""
        entries = read_json(json_path, "annotation file")
        if not isinstance(entries, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(entries).__name__}")
        self.image_folder = Path(image_folder)
        self.max_image_pixels = max_image_pixels
        self.processor = processor or SquareImages(image_size, mean, std)
        self.entries: list[tuple[str, str, dict]] = []  # (where, sample id, entry)
        self.problems: list[Problem] = []
        for i, entry in enumerate(entries):
            where = f"{json_path} entry {i}"
            problems = entry_problems(entry, where, self.image_folder)
            self.problems += problems
            if not problems:
                self.entries.append((where, str(entry.get("id", i)), entry))

    def __len__(self) -> int:
        return len(self.entries)

    def sample_ids(self) -> list[str]:
        return [sample_id for _, sample_id, _ in self.entries]

    def image_path(self, index: int) -> Path:
        return self.image_folder / self.entries[index][2]["image"]

    def text_sample(self, index: int) -> dict:
        """The sample without its image: what the collator encodes."""
        where, sample_id, entry = self.entries[index]
        return {"conversations": entry["conversations"], "question_id": sample_id, "where": where}

    def __getitem__(self, index: int) -> dict:
        sample = self.text_sample(index)
        try:
            image = load_image(self.image_path(index), self.max_image_pixels)
        except (FileNotFoundError, ValueError) as err:
            raise BadSample(Problem(sample["where"], sample["question_id"], str(err),
                                    "replace or remove the image")) from err
        return {**self.processor.process(image), **sample}
