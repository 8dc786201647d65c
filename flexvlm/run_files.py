"""Files of a run folder, written so that an interrupted run loses nothing it had written: whole
files (checkpoints, metrics.json) are written to a temporary file in the same folder and renamed
over the old one (``os.replace``: atomic within a filesystem, unlike a copy from ``$TMPDIR``); logs
(answers.jsonl, skipped.jsonl) are appended a batch at a time and flushed."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Callable

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flexvlm.weights import read_state_dict


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own, opened as open() does (mkstemp's files are private to their owner)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_writable(folder: Path, what: str) -> None:
    """Fail now, not at the first save, if ``folder`` cannot be created or written (a local one)."""
    if "://" in str(folder):
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"{what} {folder} is not writable ({err.strerror}); choose another folder "
                              "(trainer.default_root_dir, the logger's save_dir, ModelCheckpoint's dirpath)") from err


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _free_bytes(folder: Path) -> int:
    """Free space of the filesystem that holds ``folder`` (or would, once created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About what one checkpoint of ``module`` takes: its tensors, and AdamW's two moments of each
    trained parameter (a sharded parameter counts whole: the checkpoint gathers it)."""
    weights = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in module.parameters())
    return weights + sum(b.numel() * b.element_size() for b in module.buffers())


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Fail now, not at the first save, if ``folder`` (a local one) cannot hold ``needed`` bytes."""
    if "://" in str(folder):
        return
    free = _free_bytes(folder)
    if free < needed:
        raise OSError(errno.ENOSPC, f"{what} {folder} has {_size(free)} free, and one checkpoint of this model takes "
                                    f"about {_size(needed)}: free some space or choose another folder "
                                    "(trainer.default_root_dir, the logger's save_dir, ModelCheckpoint's dirpath)")


def _is_out_of_space(error: BaseException | None) -> bool:
    """Whether ``error`` or what it arose from is ENOSPC: torch's zip writer raises a RuntimeError of
    its own (inline_container.cc) after the file's write failed."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the checkpoint's own folder, then ``os.replace``: a
    run killed while saving leaves the previous checkpoint whole. Remote paths (``s3://...``) are
    saved as Lightning saves them."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        try:
            write_atomic(Path(path), lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as err:
            if not _is_out_of_space(err):
                raise
            free = _size(_free_bytes(Path(path)))
            raise OSError(errno.ENOSPC, f"no space left to save the checkpoint {path} ({free} free): the previous "
                                        "checkpoint there is kept whole; free some space and resume from it "
                                        "(--ckpt_path)") from err


RUN_CHECKPOINT = "a Lightning checkpoint of a flexvlm run (e.g. <run folder>/checkpoints/last.ckpt)"


def read_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run's Lightning checkpoint, its tensors memory-mapped (cheap to open); a path that is not one
    (missing, empty, not written by ``torch.save``, without ``state_dict``) is an error that names it
    and what was expected."""
    checkpoint = read_state_dict(path, RUN_CHECKPOINT)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not {RUN_CHECKPOINT}: no 'state_dict', it holds keys {sorted(checkpoint)[:10]}")
    return checkpoint


def keep_log_before_resume(folder: Path, checkpoint: str) -> None:
    """A run resumed from ``checkpoint`` logs into its folder (``flexvlm.cli``), where the CSV logger
    starts a new metrics.csv: the rows logged before the checkpoint's step N are kept as
    ``metrics.before_step_N.csv`` (those from N on, the resumed run logs again)."""
    log = folder / "metrics.csv"
    if not (log.is_file() and Path(checkpoint).is_file()):
        return
    step = read_run_checkpoint(checkpoint)["global_step"]
    with open(log, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if int(row["step"]) < step]
        header = reader.fieldnames or []

    def write(f: IO[bytes]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())

    write_atomic(folder / f"metrics.before_step_{step}.csv", write)


# --- metrics.json ------------------------------------------------------------------------------


def strict_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for strict JSON: a NaN or infinite number becomes null, and ``notes`` says which
    were and what they were (JSON has no NaN; Python's json would write a bare ``NaN``)."""
    clean, notes = {}, {}
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            notes[key] = f"not a finite number ({value}): e.g. a mean over no questions, or a diverged loss"
        else:
            clean[key] = value
    if notes:
        clean["notes"] = {**clean.get("notes", {}), **notes}
    return clean


def update_metrics_file(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into ``folder/metrics.json`` (strict JSON, replaced atomically); the result."""
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    old_notes = {k: v for k, v in metrics.pop("notes", {}).items() if k not in values}
    metrics = strict_metrics({**metrics, **values})
    if old_notes:
        metrics["notes"] = {**old_notes, **metrics.get("notes", {})}
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
    return metrics


# --- line logs ---------------------------------------------------------------------------------


def append_lines(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON record a line, appended and flushed (one write, so lines of processes do not mix)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a line log; a last line cut short by a kill is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: dropping a line that was cut short: {line[:80]!r}")
    return records


class SkipLog:
    """``skipped.jsonl``: each bad sample a run left out (stage, where, id, what, fix), written (and
    warned about) as it is first found: a sample met again (another epoch, a run resumed on this
    folder) is not written again. Under DDP each process keeps its own record of what is written, so
    ``count`` counts each sample once."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "skipped.jsonl"
        self._written = {self._key(r["stage"], r) for r in read_lines(self.path)}  # by an earlier run too

    @staticmethod
    def _key(stage: str, problem: dict[str, Any]) -> tuple[str, str, str | None]:
        return stage, problem["where"], problem["sample_id"]

    def add(self, stage: str, problems: list[dict[str, Any]], warn: bool = True) -> None:
        new = []
        for problem in problems:
            if self._key(stage, problem) not in self._written:
                self._written.add(self._key(stage, problem))
                new.append(problem)
        for problem in new if warn else []:
            sample = f" (id {problem['sample_id']})" if problem.get("sample_id") is not None else ""
            warnings.warn(f"{stage}: skipped bad sample {problem['where']}{sample}: {problem['what']}", stacklevel=2)
        append_lines(self.path, ({"stage": stage, **p} for p in new))

    def count(self, stage: str) -> int:
        return len({(r["where"], r["sample_id"]) for r in read_lines(self.path) if r["stage"] == stage})


class AnswerLog:
    """``answers.jsonl`` of a test run, appended a batch at a time (under DDP, one
    ``answers.rank<r>.jsonl`` per process, merged at the end), so that a run restarted on the same
    folder continues after the questions already answered. A record with ``error`` is a question
    that could not be asked; a restart asks it again. ``answers.source`` identifies the weights and
    settings the answers came from: a run with others starts over, the old answers moved to
    ``answers.previous.jsonl``."""

    def __init__(self, folder: Path, rank: int, world_size: int) -> None:
        self.folder = folder
        self.path = folder / "answers.jsonl"
        self.own = self.path if world_size == 1 else folder / f"answers.rank{rank}.jsonl"
        self.source = folder / "answers.source"

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("answers.rank*.jsonl"))

    def answered(self, source: str) -> list[dict[str, Any]]:
        """The records answered before with the same ``source``."""
        if not (self.source.is_file() and self.source.read_text() == source):
            return []
        records = [r for path in [self.path, *self._parts()] for r in read_lines(path)]
        return [r for r in records if "error" not in r]

    def start(self, source: str, answered: list[dict[str, Any]]) -> None:
        """Process 0, before any answer: the log holds just ``answered``, from ``source``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not answered and read_lines(self.path):
            os.replace(self.path, self.folder / "answers.previous.jsonl")
            warnings.warn(f"{self.path} came from other weights or settings: this test starts over, the old answers "
                          "moved to answers.previous.jsonl")
        self.source.write_text(source)
        text = "".join(json.dumps(r) + "\n" for r in answered)
        write_atomic(self.path, lambda f: f.write(text.encode()))
        for part in self._parts():
            part.unlink()

    def append(self, records: list[dict[str, Any]]) -> None:
        append_lines(self.own, records)

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Process 0, at the end: ``records`` (every process's) become answers.jsonl."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        write_atomic(self.path, lambda f: f.write(text.encode()))
        for part in self._parts():
            part.unlink()
