"""flexvlm models in lmms-eval (``pip install 'flexvlm[lmms]'``):

    python -m lmms_eval --model flexvlm --model_args pretrained=<run folder, its .ckpt, or a LLaVA folder> \\
        --tasks textvqa_val,vstar_bench

lmms-eval finds the model through this package's ``lmms_eval.models`` entry point
(``flexvlm.integrations.lmms_eval_models``). Questions go through the model's own chat template and
image preprocessing, answers through flexvlm's cached greedy generation, and likelihoods through
flexvlm's V* protocol (``LikelihoodChoice``), so lmms-eval scores what ``python -m flexvlm test``
scores on the same questions. Only this module imports lmms_eval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger  # lmms-eval's logger
from torch import Tensor

from flexvlm.architectures import from_pretrained
from flexvlm.cli import main as cli_main
from flexvlm.data.collate import VQACollator
from flexvlm.data.image import CLIP_MEAN, CLIP_STD, preprocess_image
from flexvlm.data.templates import ChatTemplate, VicunaV1Template
from flexvlm.data.tokenizer import Tokenizer, load_tokenizer
from flexvlm.evaluation import LikelihoodChoice
from flexvlm.models.generation import generate
from flexvlm.lit_module import sequence_limits
from flexvlm.models.vlm import FlexVLM
from flexvlm.run_files import read_run_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a checkpoint folder's answer length when the task sets none (a run has its own model.max_new_tokens)
FOLDER_MAX_NEW_TOKENS = 16


@dataclass
class LoadedModel:
    """A model and what its questions need: tokenizer, chat template, image normalisation, the
    answer length when the task sets none, and how generation projects high-res K/V."""

    model: FlexVLM
    tokenizer: Tokenizer
    template: ChatTemplate
    mean: Sequence[float]
    std: Sequence[float]
    max_new_tokens: int
    high_res_kv: str = "lazy"


def load_run(folder: Path, checkpoint: Path) -> LoadedModel:
    """A flexvlm run rebuilt from its saved config.yaml, with the weights of ``checkpoint``."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # a subcommand's keys: the parser built without one rejects them
        config.pop(key, None)
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False}  # only the model and data are built
    config["model"]["init_from"] = None  # the checkpoint holds every weight: not the ones the run started from
    cli = cli_main(config, run=False)
    module, data = cli.model, cli.datamodule
    module.load_state_dict(read_run_checkpoint(checkpoint)["state_dict"])
    return LoadedModel(module.model, data.tokenizer, data.template, data.hparams.mean, data.hparams.std,
                       module.hparams.max_new_tokens, module.hparams.high_res_kv)


def load_checkpoint_folder(folder: Path, vision: str | None) -> LoadedModel:
    """A LLaVA-1.5 folder as ``flexvlm.architectures.from_pretrained`` reads it, prompted as LLaVA-1.5 is."""
    return LoadedModel(from_pretrained(str(folder), vision), load_tokenizer(folder), VicunaV1Template(),
                       CLIP_MEAN, CLIP_STD, FOLDER_MAX_NEW_TOKENS)


def load(pretrained: str, vision: str | None = None) -> LoadedModel:
    """A run folder (its checkpoints/last.ckpt), one of a run's checkpoints, or a LLaVA folder."""
    path = Path(pretrained)
    if path.suffix == ".ckpt":
        return load_run(path.parent.parent, path)  # <run>/checkpoints/<name>.ckpt
    if (path / "config.yaml").is_file():
        return load_run(path, path / "checkpoints" / "last.ckpt")
    if (path / "config.json").is_file():
        return load_checkpoint_folder(path, vision)
    raise FileNotFoundError(f"pretrained={pretrained} is neither a flexvlm run (a folder with config.yaml, or a "
                            ".ckpt in its checkpoints folder) nor a checkpoint folder with config.json")


def _grouped(items: Sequence[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[Any]]:
    """The items by key, in the order the keys first appear."""
    groups: dict[Hashable, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _is_padding(request: Instance) -> bool:
    """Whether lmms-eval added the request so that every process of a multi-process run answers as
    many (a copy of another; its result is dropped). Padding is answered as the request it copies
    (lmms-eval's response cache may keep what it is given), but not written or counted."""
    return bool((request.metadata or {}).get("__padding_only__"))


def _question(request: Instance) -> tuple:
    """What the requests of one question share: task, split, document and context. Padding is a
    question apart: it copies the last option of another."""
    context, _, _, doc_id, task, split = request.args
    return task, split, doc_id, context, _is_padding(request)


def _process_file(path: Path) -> Path:
    """Where this process writes ``path``: with several processes (lmms-eval's WORLD_SIZE and RANK),
    each writes a file of its own, ``<name>.rank<r>.jsonl``."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return path
    return path.with_suffix(f".rank{os.environ.get('RANK', 0)}{path.suffix}")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        text = text.split(stop, 1)[0]
    return text.strip()


class FlexVLMLmms(lmms):
    """A flexvlm model as lmms-eval's ``flexvlm`` model.

    Model arguments (``--model_args key=value,...``):
        pretrained: a flexvlm run folder (config.yaml and checkpoints/last.ckpt), one of its
            ``.ckpt`` files, or a LLaVA-1.5 folder that ``flexvlm.architectures.from_pretrained`` reads.
        vision: the CLIP tower of a LLaVA folder in the original layout (``from_pretrained``'s).
        batch_size: questions per forward pass (lmms-eval's ``--batch_size``; a number).
        device: default ``cuda:$LOCAL_RANK`` when there is a GPU, else ``cpu``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_new_tokens: the answer length of tasks that set none (default: the run's
            ``model.max_new_tokens``; 16 for a LLaVA folder).
        answers_file: a JSONL file to write every answer into, as flexvlm's answers.jsonl: task,
            doc_id, prompt, answer (or options and their losses) and the fraction of high-res
            tokens used; with several processes, one file each (``<name>.rank<r>.jsonl``). The mean
            fraction per task is logged either way.

    Generation is greedy (``until`` and ``max_new_tokens`` honoured); a task that asks for sampling
    is an error. ``loglikelihood`` returns what lmms-eval 0.7.3's multiple-choice scoring takes
    the lowest of: the continuation's mean cross-entropy, as flexvlm's V* protocol ranks options.
    """

    def __init__(
        self,
        pretrained: str,
        vision: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int | None = None,
        answers_file: str | None = None,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a number of questions, got {batch_size!r} (flexvlm has no "
                             "automatic batch size)")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
        loaded = load(pretrained, vision)
        if loaded.model.image_size is None:
            raise ValueError(f"{pretrained}: the lmms-eval model gives LLaVA-1.5's square images; this model's "
                             f"{type(loaded.model.encoder).__name__} preprocesses its own, which flexvlm's test "
                             f"with a benchmark config (BenchmarkDataModule) takes")
        if device is None:
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = loaded.model.to(device=self._device, dtype=self.dtype).eval()
        self.tokenizer, self.template = loaded.tokenizer, loaded.template
        self.mean, self.std = loaded.mean, loaded.std
        self.high_res_kv = loaded.high_res_kv
        self.max_new_tokens = max_new_tokens or loaded.max_new_tokens
        self.batch_size = int(batch_size)
        # the likelihood protocol's collator, limited as flexvlm's test limits it
        self.collator = VQACollator(self.tokenizer, self.template,
                                    limits=sequence_limits(self.model, self.max_new_tokens))
        self.answers_file = _process_file(Path(answers_file)) if answers_file else None
        if self.answers_file is not None:
            self.answers_file.parent.mkdir(parents=True, exist_ok=True)
            self.answers_file.write_text("")

    @property
    def device(self) -> torch.device:
        return self._device

    # -- inputs ---------------------------------------------------------------------------------
    def _doc(self, request: Instance) -> dict[str, Any]:
        *_, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _sample(self, request: Instance) -> dict[str, Any]:
        """The request's question and image as flexvlm's collator takes them."""
        context, _, doc_to_visual, doc_id, task, _ = request.args
        visuals = doc_to_visual(self._doc(request))
        if len(visuals) != 1:
            raise ValueError(f"{task} doc {doc_id} has {len(visuals)} images: a flexvlm model takes one a question")
        image, box = preprocess_image(visuals[0], self.model.image_size, self.mean, self.std)
        return {"question": context, "question_id": f"{task}/{doc_id}", "image": image, "content_box": box}

    def _on_device(self, images: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return images.to(self._device, self.dtype), boxes.to(self._device)

    def _log(self, records: list[dict[str, Any]]) -> None:
        if self.answers_file is not None:
            with self.answers_file.open("a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)

    @staticmethod
    def _log_fractions(records: list[dict[str, Any]]) -> None:
        for task, answered in _grouped(records, lambda r: r["task"]).items():
            mean = sum(r["hr_fraction"] for r in answered) / len(answered)
            logger.info(f"flexvlm on {task}: {len(answered)} questions, mean fraction of high-res tokens used "
                        f"{mean:.4f}")

    # -- lmms-eval's requests -------------------------------------------------------------------
    def _generation_settings(self, request: Instance) -> tuple[tuple[str, ...], int]:
        """``until`` and ``max_new_tokens`` of a generation request (its batch's key)."""
        gen_kwargs, task = request.args[1], request.args[4]
        if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
            raise ValueError(f"{task} asks for sampling ({gen_kwargs}); flexvlm generates greedily: set "
                             "--gen_kwargs temperature=0,do_sample=false")
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(stop for stop in until if stop)
        return until, int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched by ``until`` and ``max_new_tokens``, cut at the first stop string."""
        answers = [""] * len(requests)
        records = []
        settings = _grouped(range(len(requests)), lambda i: self._generation_settings(requests[i]))
        for (until, max_new_tokens), indices in settings.items():
            collate = VQACollator(self.tokenizer, self.template, limits=sequence_limits(self.model, max_new_tokens))
            for chunk in _chunks(indices, self.batch_size):
                batch = collate([self._sample(requests[i]) for i in chunk])
                out = generate(self.model, batch["prompt_ids"].to(self._device), batch["prompt_mask"].to(self._device),
                               *self._on_device(batch["images"], batch["content_box"]), max_new_tokens=max_new_tokens,
                               eos_token_id=self.tokenizer.eos_id, high_res_kv=self.high_res_kv)
                chunk_records = []
                for i, tokens, fraction in zip(chunk, out.tokens, out.hr_fraction.tolist(), strict=True):
                    answers[i] = _cut(self.tokenizer.decode(tokens), until)
                    if not _is_padding(requests[i]):
                        context, _, _, doc_id, task, _ = requests[i].args
                        chunk_records.append({"task": task, "doc_id": doc_id, "prompt": context, "answer": answers[i],
                                              "hr_fraction": fraction})
                self._log(chunk_records)
                records += chunk_records
        self._log_fractions(records)
        return answers

    def _continuation(self, request: Instance) -> str:
        # a multiple-choice request holds the option behind the task's target delimiter; a
        # loglikelihood task's, its doc_to_target. flexvlm's template puts its own space before an answer
        target = request.args[1]
        return (target if isinstance(target, str) else target(self._doc(request))).lstrip()

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each continuation's mean cross-entropy as an answer to its context, from flexvlm's
        ``LikelihoodChoice``: a question's continuations (a multiple-choice task's options) go
        through one teacher-forced pass, ``batch_size`` questions at a time. A result is
        ``(loss, greedy)`` as lmms-eval's models give it, wrapped in a ``GenerationResult``: lmms-eval
        0.7's evaluator passes that on as it is, but turns a bare tuple into its ``str()``
        (``unwrap_generation_output``), which its multiple-choice scoring cannot read. The greedy
        flag is not computed (False): the protocol reads only the losses."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)  # each is set below
        questions = list(_grouped(range(len(requests)), lambda i: _question(requests[i])).values())
        protocol = LikelihoodChoice().to(self._device)
        records = []
        for chunk in _chunks(questions, self.batch_size):
            samples = [self._sample(requests[indices[0]]) for indices in chunk]
            options = [[self._continuation(requests[i]) for i in indices] for indices in chunk]
            images, boxes = self._on_device(torch.stack([s["image"] for s in samples]),
                                            torch.stack([s["content_box"] for s in samples]))
            batch = {"question": [s["question"] for s in samples], "question_id": [s["question_id"] for s in samples],
                     "options": options, "images": images, "content_box": boxes,
                     "answer_index": [0] * len(chunk)}  # the protocol's own verdicts go unread: lmms-eval judges
            with torch.no_grad():
                scored = protocol.score(self, batch)
            chunk_records = []
            for indices, choices, record in zip(chunk, options, scored.records, strict=True):
                for i, loss in zip(indices, record["losses"], strict=True):
                    results[i] = (loss, False)
                if not _is_padding(requests[indices[0]]):
                    _, _, _, doc_id, task, _ = requests[indices[0]].args
                    chunk_records.append({"task": task, "doc_id": doc_id, "prompt": record["prompt"],
                                          "options": choices, "losses": record["losses"],
                                          "hr_fraction": record["hr_fraction"]})
            self._log(chunk_records)
            records += chunk_records
        self._log_fractions(records)
        return [GenerationResult(text=result) for result in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("flexvlm answers one question about one image a request; multi-round "
                                  "generation (generate_until_multi_round) is not supported")
