"""The LightningModule: training, evaluation by generation, prediction. The model itself is a plain
``nn.Module`` (``FlexVLM``) injected from the config; device and precision come from the Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from flexvlm.checkpoints import load_run_weights
from flexvlm.evaluation import EvaluationProtocol, GenerationVQA, Scored, gather_records, prompt_texts
from flexvlm.generate import generate
from flexvlm.models.flex_attention import HIGH_RES_KV_MODES
from flexvlm.models.vlm import FlexVLM, VLMOutput


class FlexVLMModule(L.LightningModule):
    def __init__(
        self,
        model: FlexVLM,
        aux_objective: nn.Module | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        freeze: list[str] | None = None,
        alpha_warmup: float = 0.0,
        max_new_tokens: int = 8,
        stop_strings: list[str] | None = None,
        eval_loss: bool = True,
        high_res_kv: str = "lazy",
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            model: the VLM.
            aux_objective: optional extra loss, ``(lr_tokens, hr_tokens, batch, selection_maps) ->
                loss`` with ``selection_maps`` as in ``VLMOutput`` (the built-in task's dense
                objective, standing in for a pre-trained tower and a pre-trained LLM's grounding).
                Its attribute ``needs_maps`` (default True) says whether it reads the maps, which
                then keep their gradient.
            lr, weight_decay, warmup_ratio: AdamW with linear warm-up then cosine decay to zero
                (the paper: 2e-5, 0, 0.03).
            freeze: parameter-name prefixes to freeze (e.g. ``encoder.backbone``); a prefix that
                matches nothing is an error.
            alpha_warmup: fraction of training over which the answer rows' blend of plain and
                hierarchical attention ramps from 0 to 1 (the release: 0.1); 0 disables it.
            max_new_tokens, stop_strings: generation at validation / test / predict time.
            eval_loss: also log the loss of the reference answer at validation / test (one more
                forward pass a batch).
            high_res_kv: how generation projects high-res K/V (``flexvlm.generate``): ``lazy`` (a
                token when first selected; cheapest for short answers) or ``prefill`` (all at the
                first step; cheaper per step for long answers, see docs/benchmarks.md).
            init_from: start from another run's weights (its ``.ckpt``) but not its optimizer or
                step count, e.g. every mode of a study from one low-res-only run; W_K', W_V' that
                the source lacks start as W_K, W_V (``flexvlm.checkpoints.load_run_weights``).

        Answers are scored by the datamodule's ``protocol`` (``flexvlm.evaluation``) if it has
        one, else by ``GenerationVQA``.
        """
        super().__init__()
        if high_res_kv not in HIGH_RES_KV_MODES:
            raise ValueError(f"unknown high_res_kv {high_res_kv!r}; valid: {list(HIGH_RES_KV_MODES)}")
        self.save_hyperparameters(ignore=["model", "aux_objective"])
        self.model = model
        self.aux_objective = aux_objective
        self.stop_strings = stop_strings or []
        if init_from is not None:
            load_run_weights(self.model, aux_objective, init_from)
        self._freeze(freeze or [])
        self.protocol: EvaluationProtocol = GenerationVQA()
        # torchmetrics means rather than self.log(sync_dist=True): Lightning's synced mean floors the
        # summed batch sizes, wrong when processes answered different numbers of questions
        self.loss_mean, self.hr_fraction_mean = MeanMetric(), MeanMetric()
        self._test_records: list[dict[str, Any]] = []

    def _freeze(self, prefixes: list[str]) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        for prefix in prefixes:
            matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if not matched:
                tops = sorted({n.rsplit(".", 2)[0] for n in names})
                raise ValueError(f"freeze prefix {prefix!r} matches no parameter; module paths: {tops}")
            for name, param in self.model.named_parameters():
                if name in matched:
                    param.requires_grad_(False)

    # -- training -------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """Weight of the hierarchical attention for answer rows, following training progress."""
        warmup = self.hparams.alpha_warmup
        if warmup <= 0 or self._trainer is None:
            return 1.0
        return min(1.0, self.trainer.global_step / max(1.0, warmup * self.trainer.estimated_stepping_batches))

    def _forward(self, batch: dict[str, Any], alpha: float = 1.0) -> VLMOutput:
        # the selecting maps keep their gradient only for an objective that trains on them
        map_grad = self.aux_objective is not None and getattr(self.aux_objective, "needs_maps", True)
        return self.model(batch["input_ids"], batch["attention_mask"], batch["images"], batch.get("content_box"),
                          labels=batch["labels"], alpha=alpha, map_grad=map_grad)

    def _aux_loss(self, out: VLMOutput, batch: dict[str, Any]) -> Tensor:
        encoder = self.model.encoder
        lr = out.lr_features if out.lr_features is not None else encoder.encode_low_res(batch["images"])
        hr = out.hr_features if out.hr_features is not None else encoder.encode_high_res(batch["images"])
        return self.aux_objective(lr, hr, batch, out.selection_maps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        alpha = self.alpha
        out = self._forward(batch, alpha)
        loss = out.loss
        size = batch["input_ids"].shape[0]
        if self.aux_objective is not None:
            aux = self._aux_loss(out, batch)
            self.log("train/aux_loss", aux, batch_size=size)
            self.log("train/lm_loss", out.loss, batch_size=size)
            loss = loss + aux
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/alpha", alpha, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        for layer, fraction in out.selected_fraction.items():
            self.log(f"train/hr_fraction/layer{layer}", fraction, batch_size=size)
        if out.selected_fraction:
            mean = torch.stack(list(out.selected_fraction.values())).mean()
            self.log("train/hr_fraction", mean, prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        protocol = getattr(self.trainer.datamodule, "protocol", None)
        if protocol is not None:
            self.protocol = protocol  # a submodule from here on, so the strategy moves its metric

    def _from_datamodule(self, name: str) -> Any:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, name):
            raise RuntimeError(f"evaluation needs a datamodule with a .{name}")
        return getattr(datamodule, name)

    @property
    def tokenizer(self):
        return self._from_datamodule("tokenizer")

    @property
    def collator(self):
        return self._from_datamodule("collator")

    def _decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens)
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    def answer(self, batch: dict[str, Any]) -> tuple[list[str], Tensor, dict[int, Tensor]]:
        """Greedy answers to the batch's left-padded prompts, HR fraction per sample, prefill masks."""
        out = generate(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch.get("content_box"),
                       max_new_tokens=self.hparams.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                       high_res_kv=self.hparams.high_res_kv)
        return [self._decode(t) for t in out.tokens], out.hr_fraction, out.prefill_masks

    def _evaluate(self, batch: dict[str, Any], stage: str) -> Scored:
        size = batch["input_ids"].shape[0]
        if self.hparams.eval_loss:
            self.loss_mean.update(self._forward(batch).loss, weight=size)
            self.log(f"{stage}/loss", self.loss_mean, batch_size=size)
        scored = self.protocol.score(self, batch)
        if self.model.mode == "flex":
            self.hr_fraction_mean.update(scored.hr_fraction)
            self.log(f"{stage}/hr_fraction", self.hr_fraction_mean, prog_bar=True, batch_size=size)
        return scored

    def _log_scores(self, stage: str) -> dict[str, float]:
        scores = {f"{stage}/{name}": value for name, value in self.protocol.compute().items()}
        # compute() has already summed the metric over processes: sync_dist only averages equal values
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        return {name: float(value) for name, value in scores.items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self.protocol.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        scored = self._evaluate(batch, "test")
        self._test_records += scored.records
        return {"answers": [r["answer"] for r in scored.records], "masks": scored.masks}

    def on_test_epoch_start(self) -> None:
        self.protocol.reset()
        self._test_records = []

    def on_test_epoch_end(self) -> None:
        """answers.jsonl and metrics.json into the run folder (records gathered from every process)."""
        scores = self._log_scores("test")
        records = gather_records(self._test_records)
        log_dir = self.trainer.log_dir  # a broadcast from rank 0 in DDP: every process must ask for it
        if not self.trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "answers.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        # the scores logged just now reach callback_metrics only after this hook
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        metrics |= scores
        metrics["num_questions"] = len(records)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        answers, fraction, masks = self.answer(batch)
        prompts = prompt_texts(batch, self.tokenizer)
        return [
            {"question_id": batch["question_id"][i], "prompt": prompts[i], "answer": a,
             "hr_fraction": float(fraction[i]), "masks": {layer: m[i].cpu() for layer, m in masks.items()}}
            for i, a in enumerate(answers)
        ]
