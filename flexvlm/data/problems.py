"""Bad samples: what is wrong with one sample (a ``Problem``), the error that carries it
(``BadSample``), and the policy that skips or stops on it.

A problem names where the sample is (file and entry index or line), its id, what is wrong and what
to do. ``on_bad_sample: skip`` drops such samples (the run records them in ``skipped.jsonl``);
``error`` stops at the first one, or at setup for those found before the work starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from torch.utils.data import Dataset

BadSamplePolicy = Literal["skip", "error"]
MAX_LISTED = 20  # problems listed in one error message; check-data lists them all


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample (``error``: it cannot be used) or worth knowing (``warning``:
    it is used as is)."""

    where: str  # the file, with the entry index or line
    sample_id: str | None
    what: str
    fix: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        sample = f" (id {self.sample_id})" if self.sample_id is not None else ""
        fix = f"; {self.fix}" if self.fix else ""
        return f"{self.where}{sample}: {self.what}{fix}"

    def record(self) -> dict[str, Any]:
        return asdict(self)


class BadSample(ValueError):
    """A sample that cannot be used; the message names its file, entry and id."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def shared_ids(samples: Iterable[tuple[str, str]], severity: str, fix: str) -> list[Problem]:
    """For each (where, id) whose id an earlier sample has, a problem naming both."""
    first: dict[str, str] = {}
    problems = []
    for where, sample_id in samples:
        if sample_id in first:
            problems.append(Problem(where, sample_id, f"{first[sample_id]} has the same id", fix, severity))
        else:
            first[sample_id] = where
    return problems


def check_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in get_args(BadSamplePolicy):
        raise ValueError(f"on_bad_sample must be one of {get_args(BadSamplePolicy)}, got {on_bad_sample!r}")


def problem_list(problems: list[Problem], limit: int = MAX_LISTED) -> str:
    """One problem a line, at most ``limit`` of them."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (python -m flexvlm check-data lists them all)")
    return "\n".join(lines)


def raise_if_any(problems: list[Problem], what: str) -> None:
    """The ``error`` policy at setup: every problem found, in one message."""
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ValueError(f"{what}: {len(errors)} bad samples (on_bad_sample: error):\n{problem_list(errors)}\n"
                         "fix or remove them, or set data.init_args.on_bad_sample: skip to train without them")


@dataclass(frozen=True)
class Skipped:
    """What a dataset returns in place of a sample it could not load (skip policy); the collator
    drops it into the batch's ``skipped`` list."""

    problem: Problem


class SkipBadSamples(Dataset):
    """A dataset whose ``BadSample`` errors become ``Skipped`` markers instead of ending the run."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        try:
            return self.dataset[index]
        except BadSample as bad:
            return Skipped(bad.problem)
