"""The LightningModule: training, evaluation by generation, prediction. The model itself is a plain
``nn.Module`` (``FlexVLM``) injected from the config; device and precision come from the Trainer."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from flexvlm.data.collate import SequenceLimits
from flexvlm.data.datamodule import STAGE_SPLITS
from flexvlm.evaluation import EvaluationProtocol, GenerationVQA, Scored, gather_records, prompt_texts
from flexvlm.models.families import high_res_copies
from flexvlm.models.flex_attention import HIGH_RES_KV_MODES
from flexvlm.models.vlm import FlexVLM, VLMOutput
from flexvlm.run_files import (
    AnswerLog, SkipLog, check_free_space, check_writable, checkpoint_bytes, read_run_checkpoint, update_metrics_file,
)
from flexvlm.sharding import full_value, fully_shard, is_sharded, on_any_process
from flexvlm.weights import load_state_dict_strict, take_parts


def load_run_weights(model: nn.Module, aux_objective: nn.Module | None, path: str | Path) -> None:
    """Start from another flexvlm run's weights (its Lightning checkpoint, e.g. ``last.ckpt``),
    without its optimizer or step count: the VLM's tensors strictly (W_K', W_V' that the source
    lacks, e.g. a low-res-only run, start as the same layer's W_K, W_V), and the auxiliary
    objective's when both runs have one. A mismatch lists the names and shapes involved."""
    source = str(path)
    checkpoint = read_run_checkpoint(path)
    parts = take_parts(checkpoint["state_dict"], {"model.": ("model", ""), "aux_objective.": ("aux", "")}, source)
    names = model.state_dict()
    load_state_dict_strict(model, {**high_res_copies(names, parts["model"]), **parts["model"]}, source)
    if aux_objective is not None and parts["aux"]:
        load_state_dict_strict(aux_objective, parts["aux"], source)


def sequence_limits(model: FlexVLM, max_new_tokens: int) -> SequenceLimits:
    """What ``model`` takes in text ids: its vocabulary, and its positions less the image's tokens
    (which replace one placeholder id), less ``max_new_tokens`` for a generation prompt."""
    image_tokens = model.placeholder_tokens
    positions = model.config.max_position_embeddings
    max_length = positions - image_tokens + 1
    if max_length - max_new_tokens < 2:
        raise ValueError(f"the model's {positions} positions (max_position_embeddings) hold no prompt: the image "
                         f"takes {image_tokens} and the answer {max_new_tokens} (model.max_new_tokens)")
    return SequenceLimits(model.config.vocab_size, max_length, max_length - max_new_tokens)


def fit_data_to_model(datamodule: Any, model: FlexVLM, max_new_tokens: int) -> None:
    """What the data must give ``model`` from here on: ids it takes, sequences it holds, and images as
    its architecture preprocesses them (its encoder's image processor) or, for LLaVA-1.5's square
    images, of the size it takes."""
    processor = model.encoder.image_processor(model.mode)
    if hasattr(datamodule, "fit_to_model"):
        datamodule.fit_to_model(sequence_limits(model, max_new_tokens), processor)
    size = getattr(datamodule, "hparams", {}).get("image_size")
    if processor is None and size is not None and size != model.image_size:  # linked where the config allows (flexvlm.cli)
        raise ValueError(f"the data's images are {size} px (data.init_args.image_size), the model takes "
                         f"{model.image_size} (its zoom x its backbone's side): set data.init_args.image_size "
                         f"to {model.image_size}")


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
        compiled_decode: bool = False,
        init_from: str | None = None,
        nonfinite_loss_skips: int = 0,
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
            high_res_kv: how generation projects high-res K/V (``flexvlm.models.generation``): ``lazy`` (a
                token when first selected; cheapest for short answers) or ``prefill`` (all at the
                first step; cheaper per step for long answers, see docs/benchmarks.md).
            compiled_decode: generate with the compiled decode step of static shapes (docs/method.md, 5b;
                HR K/V projected at the prefill, whatever ``high_res_kv`` says); a model it cannot run is
                refused at the first generation.
            init_from: start from another run's weights (its ``.ckpt``) but not its optimizer or
                step count, e.g. every mode of a study from one low-res-only run; W_K', W_V' that
                the source lacks start as W_K, W_V (``load_run_weights``).
            nonfinite_loss_skips: training batches whose loss is NaN or infinite that are skipped
                (no update, a warning) before the next one stops the run with an error naming its
                step. Weights that are not finite are never saved over a checkpoint.

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
        if init_from is not None and not model.is_meta:  # else once materialised, in configure_model
            load_run_weights(self.model, aux_objective, init_from)
        self._freeze(freeze or [])
        self.protocol: EvaluationProtocol = GenerationVQA()
        # torchmetrics means rather than self.log(sync_dist=True): Lightning's synced mean floors the
        # summed batch sizes, wrong when processes answered different numbers of questions
        self.loss_mean, self.hr_fraction_mean = MeanMetric(), MeanMetric()
        self._test_records: list[dict[str, Any]] = []  # answered in this run, by this process
        self._test_errors: list[dict[str, Any]] = []  # the questions it could not ask
        self._answered: list[dict[str, Any]] = []  # answered before a restart of the run
        self._nonfinite_batches = 0
        self._saved_step: int | None = None  # the step of the last checkpoint saved by this run
        self._folder = Path(".")  # the run folder, known at setup
        self._skip_log: SkipLog | None = None
        self._answer_log: AnswerLog | None = None

    def configure_model(self) -> None:
        """A model built on the meta device (``--empty_init true``) gets its tensors here, on the
        Trainer's device (CPU without a Trainer, e.g. in ``load_from_checkpoint``): each process builds
        nothing on the host first. Then ``init_from``'s weights, if named. Under Lightning's
        ``ModelParallelStrategy`` the model is first sharded with FSDP2 over the data-parallel
        processes (``FlexVLM.fully_shard``), so each materialises and loads only its shard. A model
        with tensors is left as it is, so Lightning may call this more than once."""
        mesh = self.device_mesh  # set by ModelParallelStrategy alone
        if mesh is not None and not self.model.is_sharded:
            if mesh["tensor_parallel"].size() > 1:
                raise ValueError("flexvlm shards its model with FSDP2 alone, without tensor parallelism: give "
                                 "ModelParallelStrategy tensor_parallel_size: 1 and data_parallel_size: <processes>")
            self.model.fully_shard(mesh["data_parallel"])
            if self.aux_objective is not None and any(True for _ in self.aux_objective.parameters()):
                fully_shard(self.aux_objective, mesh["data_parallel"])
            plain = [name for name, p in self.named_parameters() if not is_sharded(p)]
            if plain:  # FSDP2 averages the gradients of its shards alone
                raise TypeError(f"parameters outside the sharded model and objective would train apart on each "
                                f"process: {plain[:5]}")
        if not self.model.is_meta:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.model.materialize(device)
        if self.hparams.init_from is not None:
            load_run_weights(self.model, self.aux_objective, self.hparams.init_from)

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
        lr, hr = out.lr_features, out.hr_features
        if lr is None or hr is None:  # a mode that encodes one path only
            lr, hr = self.model.encoder.grid_features(batch["images"])
        return self.aux_objective(lr, hr, batch, out.selection_maps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self._record_skipped(batch, "train")
        size = len(batch["question_id"])  # 0: every sample of the batch was bad
        alpha = self.alpha
        out = self._forward(batch, alpha) if size else None
        aux = self._aux_loss(out, batch) if out is not None and self.aux_objective is not None else None
        loss = None if out is None else out.loss if aux is None else out.loss + aux
        if self._skip_step(loss, batch_idx):
            return None
        if aux is not None:
            self.log("train/aux_loss", aux, batch_size=size)
            self.log("train/lm_loss", out.loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/alpha", alpha, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        for layer, fraction in out.selected_fraction.items():
            self.log(f"train/hr_fraction/layer{layer}", fraction, batch_size=size)
        if out.selected_fraction:
            mean = torch.stack(list(out.selected_fraction.values())).mean()
            self.log("train/hr_fraction", mean, prog_bar=True, batch_size=size)
        return loss

    def _skip_step(self, loss: Tensor | None, batch_idx: int) -> bool:
        """Whether to skip this step (no loss: a batch of bad samples; a loss that is not finite), and
        an error once ``nonfinite_loss_skips`` non-finite batches have been skipped."""
        # decided together: under DDP every process skips the step or none does
        flags = torch.tensor([loss is None, loss is not None and not bool(torch.isfinite(loss))],
                             dtype=torch.float32, device=self.device)
        empty, nonfinite = (self.trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if not nonfinite:
            return empty
        self._nonfinite_batches += 1
        step, allowed = self.trainer.global_step, self.hparams.nonfinite_loss_skips
        value = "" if loss is None else f" ({float(loss)})"
        if self._nonfinite_batches > allowed:
            raise FloatingPointError(
                f"the training loss is not finite{value} at step {step} (epoch {self.current_epoch}, batch "
                f"{batch_idx}), after {allowed} such batches skipped (model.nonfinite_loss_skips): the run stops, "
                "and its checkpoints stay as they were. A loss that diverges like this usually needs a lower "
                f"learning rate (model.lr is {self.hparams.lr:g}) or gradient clipping (trainer.gradient_clip_val)")
        warnings.warn(f"skipping the batch at step {step} (batch {batch_idx}): its loss is not finite "
                      f"({self._nonfinite_batches} of {allowed} allowed, model.nonfinite_loss_skips)")
        return True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses to save weights that hold NaN or infinities: the last good checkpoint stays. Notes the
        step saved (``_bring_last_checkpoint_to_final_step``)."""
        bad = [name for name, t in checkpoint["state_dict"].items()
               if t.is_floating_point() and not bool(full_value(torch.isfinite(t).all()))]
        if bad:
            raise FloatingPointError(
                f"the weights are not finite at step {self.trainer.global_step} (in {len(bad)} of "
                f"{len(checkpoint['state_dict'])} tensors, first {bad[0]}): not saving them over the last checkpoint. "
                f"The training diverged: lower the learning rate (model.lr is {self.hparams.lr:g})")
        self._saved_step = checkpoint["global_step"]

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
        datamodule = self.trainer.datamodule
        protocol = getattr(datamodule, "protocol", None)
        if protocol is not None:
            self.protocol = protocol  # a submodule from here on, so the strategy moves its metric
        fit_data_to_model(datamodule, self.model, self.hparams.max_new_tokens)
        fit_objective = getattr(self.aux_objective, "fit_to_data", None)  # an objective's checks of the task
        if fit_objective is not None:
            fit_objective(datamodule)
        # the logger's folder, asked here where every process is (a broadcast from process 0 in DDP)
        folder = self._folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if stage == "fit":
            check_writable(folder, "the run folder")
            one_checkpoint = checkpoint_bytes(self)
            for callback in self.trainer.checkpoint_callbacks:
                if callback.dirpath is not None:
                    check_writable(Path(callback.dirpath), "the checkpoint folder")
                    check_free_space(Path(callback.dirpath), one_checkpoint, "the checkpoint folder")
        self._skip_log = SkipLog(folder)
        if self.trainer.is_global_zero:  # the samples the datamodule left out (and listed) as it read the files
            for split in STAGE_SPLITS[stage]:
                problems = getattr(datamodule, "problems", {}).get(split, [])
                self._skip_log.add(split, [p.record() for p in problems], warn=False)
        if stage == "test":
            self._answer_log = AnswerLog(folder, self.trainer.global_rank, self.trainer.world_size)
            datamodule.skip_answered(self._resume_answers)

    def _answer_source(self) -> str:
        """What answers depend on: the weights (a checksum of every tensor; loaded from a checkpoint
        by now), the module's settings, the model's selection."""
        sums = [float(full_value(t.double().sum())) for t in self.model.state_dict().values() if t.is_floating_point()]
        settings = [sums, dict(self.hparams), repr(getattr(self.model, "selection", None))]
        return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()

    def _record_skipped(self, batch: dict[str, Any], split: str) -> None:
        """The batch's bad samples into skipped.jsonl."""
        if batch.get("skipped"):
            self._skip_log.add(split, batch["skipped"])

    def _resume_answers(self) -> set[str]:
        """The questions to leave out: a test restarted on the same folder, with the same weights and
        settings, continues after those it has answered. Asked by the datamodule as it makes the test
        loader, when the weights are loaded."""
        trainer = self.trainer
        source = trainer.strategy.broadcast(self._answer_source())
        self._answered = self._answer_log.answered(source)
        trainer.strategy.barrier()  # every process has read the log before process 0 rewrites it
        if trainer.is_global_zero:
            self._answer_log.start(source, self._answered)
        if self._answered:
            print(f"continuing the test in {self._folder}: {len(self._answered)} questions answered before")
        return {r["question_id"] for r in self._answered}

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
        out = self.model.generate(batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch.get("content_box"),
                                  max_new_tokens=self.hparams.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                                  high_res_kv=self.hparams.high_res_kv, compiled=self.hparams.compiled_decode)
        return [self._decode(t) for t in out.tokens], out.hr_fraction, out.prefill_masks

    def _forwards(self, batch: dict[str, Any], protocol: EvaluationProtocol) -> tuple[Tensor | None, Scored]:
        """Every forward pass of an evaluation batch: the reference answer's loss (``eval_loss``), then
        the protocol's answers, scored by ``protocol``."""
        loss = self._forward(batch).loss if self.hparams.eval_loss else None
        return loss, protocol.score(self, batch)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> Scored:
        size = batch["input_ids"].shape[0]
        loss, scored = self._forwards(batch, self.protocol)
        if loss is not None:
            self.loss_mean.update(loss, weight=size)
            self.log(f"{stage}/loss", self.loss_mean, batch_size=size)
        if self.model.spends_high_res_budget:
            self.hr_fraction_mean.update(scored.hr_fraction)
            self.log(f"{stage}/hr_fraction", self.hr_fraction_mean, prog_bar=True, batch_size=size)
        return scored

    def _log_scores(self, stage: str) -> dict[str, float]:
        scores = {f"{stage}/{name}": value for name, value in self.protocol.compute().items()}
        # compute() has already summed the metric over processes: sync_dist only averages equal values
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        return {name: float(value) for name, value in scores.items()}

    # Every forward of a sharded model (FSDP2) gathers its weights from all processes, so each process
    # must run as many as the others: there, an evaluation batch is a round that all take part in. A
    # process without questions in a round (its batch held bad samples only, or it has no batch left:
    # a sampler that splits unevenly) runs the forwards of a question it answered before, unscored.
    def _scored(self, batch: dict[str, Any], stage: str) -> Scored | None:
        """The batch's questions answered and scored; None when it has none."""
        asked = bool(batch["question_id"])
        if not self.model.is_sharded:
            return self._evaluate(batch, stage) if asked else None
        if asked and self._stand_in is None:
            self._stand_in = self._first_question(batch)
        self._round(has_batch=True)
        scored = None
        if asked:
            scored = self._evaluate(batch, stage)
        else:
            self._stand_in_forwards()
        # the rounds that follow this process's last batch are taken here, before Lightning's loop ends:
        # its end syncs the logged metrics, a collective of its own
        if self.trainer._evaluation_loop.batch_progress.is_last_batch:
            self._rounds_after_the_last_batch()
        return scored

    @staticmethod
    def _first_question(batch: dict[str, Any]) -> dict[str, Any]:
        """A batch of the batch's first question (a copy: the batch's tensors are not kept)."""
        return {key: value[:1].clone() if isinstance(value, Tensor) else value[:1] for key, value in batch.items()}

    def _round(self, has_batch: bool) -> bool:
        """A round's start, on every process together: whether any process has a batch in it. If one
        has none to take part with, the same error on every process (rather than a deadlock)."""
        flags = on_any_process(torch.tensor([has_batch, self._stand_in is None], device=self.device))
        any_batch, any_without_stand_in = flags.tolist()
        if any_batch and any_without_stand_in:
            raise RuntimeError(
                "under FSDP2 every process takes part in every forward of an evaluation, but a process has no "
                "question in this batch (its samples were all bad, or its sampler gave it fewer batches) and none "
                "answered before to take part with: give every process a question in its first batch (Lightning's "
                "distributed sampler, trainer.use_distributed_sampler: true, splits the questions evenly)")
        return any_batch

    def _stand_in_forwards(self) -> None:
        """The forwards of a question answered before, scored by a copy of the protocol that is then
        dropped: this process's part in a round of the others."""
        self._forwards(self._stand_in, copy.deepcopy(self.protocol))

    def _rounds_after_the_last_batch(self) -> None:
        """A process out of batches takes part in the rounds of the others until none has a batch left."""
        while self._round(has_batch=False):
            self._stand_in_forwards()

    def _start_evaluation_epoch(self) -> None:
        self.protocol.reset()
        self._stand_in: dict[str, Any] | None = None  # the question this process takes part in rounds with

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._record_skipped(batch, "val")
        self._scored(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation_epoch()

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        self._record_skipped(batch, "test")
        self._record_unasked(batch.get("skipped", []))
        scored = self._scored(batch, "test")
        if scored is None:
            return None
        self._test_records += scored.records
        self._answer_log.append(scored.records)  # written as they come: a restart continues after them
        return {"answers": [r["answer"] for r in scored.records], "masks": scored.masks}

    def on_test_epoch_start(self) -> None:
        self._start_evaluation_epoch()
        self._test_records, self._test_errors = [], []
        if not self.trainer.is_global_zero:
            return
        left_out = getattr(self.trainer.datamodule, "problems", {}).get("test", [])
        self._record_unasked([p.record() for p in left_out])
        if self._answered:  # counted once, where the metrics are summed
            self.protocol.restore(self._answered)
            if self.model.spends_high_res_budget:
                self.hr_fraction_mean.update(torch.tensor([r["hr_fraction"] for r in self._answered]))

    def _record_unasked(self, problems: list[dict[str, Any]]) -> None:
        """Questions that could not be asked are in the answers too, with their error."""
        errors = [{"question_id": p["sample_id"], "where": p["where"], "error": p["what"]} for p in problems]
        self._test_errors += errors
        self._answer_log.append(errors)

    def on_test_epoch_end(self) -> None:
        """answers.jsonl and metrics.json into the run folder (records gathered from every process)."""
        scores = self._log_scores("test")
        records = self._answered + gather_records(self._test_records)
        errors = gather_records(self._test_errors)
        self.trainer.strategy.barrier()  # every process's skipped samples are in skipped.jsonl
        if not self.trainer.is_global_zero:
            return
        self._answer_log.finish(records + errors)
        # the scores logged just now reach callback_metrics only after this hook
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        metrics |= scores
        skipped = len(errors)
        metrics |= {"num_questions": len(records), "num_skipped": skipped}
        if self._answered and "test/loss" in metrics:
            metrics["notes"] = {"test/loss": f"over the {len(records) - len(self._answered)} questions answered "
                                             "since the restart"}
        update_metrics_file(self._folder, metrics)
        print(f"the test scores cover {len(records)} of {len(records) + skipped} questions"
              + (f"; {skipped} could not be asked (listed in {self._skip_log.path})" if skipped else ""))

    def on_train_end(self) -> None:
        """``last.ckpt`` brought to the final step; the count of bad samples left out, printed and
        written into metrics.json."""
        self._bring_last_checkpoint_to_final_step()
        self.trainer.strategy.barrier()  # every process's skipped samples are in skipped.jsonl
        if not self.trainer.is_global_zero:
            return
        counts = {f"skipped/{split}": self._skip_log.count(split) for split in STAGE_SPLITS["fit"]}
        update_metrics_file(self._folder, counts)
        if any(counts.values()):
            print(f"bad samples left out: {counts['skipped/train']} in training, {counts['skipped/val']} in "
                  f"validation (listed in {self._skip_log.path})")

    def _bring_last_checkpoint_to_final_step(self) -> None:
        """Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` together with its
        periodic saves only: a 150-step run saving every 100 steps would end with the weights of step
        100 in it, which ``--ckpt_path``, ``init_from`` and the sweep would then read as the final model.
        Its saves run before this hook (callbacks first), so a checkpoint of another step means the
        final weights are not on disk yet. Every process calls this (saving is a collective)."""
        step = self.trainer.global_step
        if self._saved_step == step:
            return
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", False) and getattr(callback, "last_model_path", ""):
                self.trainer.save_checkpoint(callback.last_model_path)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        self._record_skipped(batch, "test")
        if not batch["question_id"]:
            return []
        answers, fraction, masks = self.answer(batch)
        prompts = prompt_texts(batch, self.tokenizer)
        return [
            {"question_id": batch["question_id"][i], "prompt": prompts[i], "answer": a,
             "hr_fraction": float(fraction[i]), "masks": {layer: m[i].cpu() for layer, m in masks.items()}}
            for i, a in enumerate(answers)
        ]
