"""The paper's protocol in miniature: every mode fine-tuned from one stage-1 model, over seeds.

    python -m flexvlm.protocol experiments/synthetic/protocol/protocol.yaml

A protocol file names a base config, the stage-1 and stage-2 configs, the seeds, the stage-2
schedule candidates and studies (each a stage-1 geometry and the modes fine-tuned from it):

- stage 1, once per study and seed (a study may name its own ``seeds``): base + the study's files +
  ``stage1``;
- the schedule, chosen once on the validation split: the candidate whose mean final
  ``val/accuracy`` over the ``schedule.modes`` of the first study (first seed) is highest; the
  same one then serves every mode;
- stage 2, per study, mode and seed: base + the study's files + the mode's file + ``stage2`` + the
  chosen candidate, started with ``--model.init_from`` from the stage-1 run of the same seed, then
  tested.

The seed sets ``seed_everything`` (initialisation) and the training order
(``data.init_args.shuffle_seed``); the data and the test split stay the same. Each run is a
subprocess of ``python -m flexvlm fit``, in ``<save_dir>/<study>/<mode>/seed<k>``; a run that
finished with the same configs (their content), seed and arguments, and for stage 2 from the same
stage-1 weights, is reused (``flexvlm.runs``), so an interrupted protocol picks up where it stopped
and a changed config trains what it changes again.

A study may also give ``budgets`` (shares of the high-res tokens kept) and ``budgeted`` (mode -> the
dotted setting that takes a budget, e.g. ``model.model.init_args.selection.init_args.ratio``, or
``{setting: <dotted>, budgets: [...]}`` for a mode run at budgets of its own): such a mode runs once
per budget, as ``mode@budget``; and ``evaluations`` (mode -> a mode it trains): a
training-free method (FastV) is not trained but tested, per seed, from the weights of that mode's
stage-2 run (hd's), under that mode's configs with its own file stacked last.

The results go to ``<out>/runs.csv`` (one row a run), ``<out>/results.md`` (mean +- std over seeds,
accuracy split by the answers' tags where a dataset gives them, e.g. the question kind, the schedule
choice and the targets), and pictures of a line per study and mode (a point per budget; a mode without
budgets is a dot): ``<out>/accuracy_vs_budget.png``, ``accuracy_vs_flops.png``,
``accuracy_vs_prefill_time.png`` and ``accuracy_vs_decode_time.png``. A tested row also has the
cost of a whole greedy generation per sample on the first test batch with the weights tested (counted
once, also for a run finished before): its FLOPs, and its measured time to the first token and per
later token (``flexvlm.timing``; every run generates ``max_new_tokens``, each in its own process, so
read the times as the methods' order on this machine), and the run's wall time (training and test).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flexvlm.plots import COSTS, accuracy_lines_plot
from flexvlm.runs import config_contents, not_reusable, reuse_or_train, run_command, written
from flexvlm.sweep import build_quietly, trained_cost

STAGE1 = "stage1"
DONE = "done.json"  # a run's result, written last


@dataclass
class Study:
    name: str
    files: list[str]  # stacked on the base in both stages (e.g. another high-res size)
    modes: list[str]  # experiment names, <experiments>/<mode>.yaml
    seeds: list[int] | None = None  # None: the protocol's
    budgets: list[float] = field(default_factory=list)  # shares of the high-res tokens kept
    budgeted: dict[str, str] = field(default_factory=dict)  # mode -> the dotted setting a budget goes to
    mode_budgets: dict[str, list[float]] = field(default_factory=dict)  # a budgeted mode's own budgets
    evaluations: dict[str, str] = field(default_factory=dict)  # mode -> the trained mode whose run it tests

    def runs(self) -> list[tuple[str, str, list[str]]]:
        """(run name, mode, extra arguments): a budgeted mode once per budget (``mode@budget``)."""
        runs = []
        for mode in self.modes:
            if mode in self.budgeted:
                runs += [(f"{mode}@{b:g}", mode, [f"--{self.budgeted[mode]}", str(b)])
                         for b in self.mode_budgets.get(mode, self.budgets)]
            else:
                runs.append((mode, mode, []))
        return runs

    def keep_budgets(self, budgets: list[float]) -> None:
        """Run the budgeted modes only at those of their budgets that ``budgets`` lists."""
        self.mode_budgets = {mode: [b for b in self.mode_budgets.get(mode, self.budgets) if b in budgets]
                             for mode in self.budgeted}

    def check(self) -> None:
        if unknown := sorted((set(self.budgeted) | set(self.evaluations)) - set(self.modes)):
            raise ValueError(f"study {self.name!r}: budgeted / evaluations name modes it does not run: {unknown}")
        if bool(self.budgets) != bool(self.budgeted):
            raise ValueError(f"study {self.name!r}: budgets and budgeted go together (the shares, and the modes' "
                             f"settings that take them)")
        for mode, trained in self.evaluations.items():
            if trained not in self.modes or trained in self.evaluations or trained in self.budgeted:
                raise ValueError(f"study {self.name!r}: {mode} is tested from {trained!r}, which must be a mode the "
                                 f"study trains once a seed (no evaluation, no budget)")


@dataclass
class Protocol:
    base: str
    experiments: str
    stage1: str
    stage2: str
    seeds: list[int]
    save_dir: str
    studies: list[Study]
    schedule_modes: list[str]
    candidates: dict[str, list[str]]  # name -> extra CLI arguments
    targets: dict = field(default_factory=dict)
    claims: list[dict] = field(default_factory=list)  # orderings to check on the means (``check_claims``)

    @classmethod
    def load(cls, path: str | Path) -> "Protocol":
        raw = yaml.safe_load(Path(path).read_text())
        known = {"base", "experiments", "stage1", "stage2", "seeds", "save_dir", "studies", "schedule", "targets",
                 "claims"}
        if unknown := set(raw) - known:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        study_keys = {"files", "modes", "seeds", "budgets", "budgeted", "evaluations"}
        for name, s in raw["studies"].items():
            if unknown := set(s) - study_keys:
                raise ValueError(f"{path}: study {name!r} has unknown keys {sorted(unknown)}; valid: {sorted(study_keys)}")
        studies = [Study(name, list(s.get("files", [])), list(s["modes"]), s.get("seeds"),
                         [float(b) for b in s.get("budgets", [])], *_budgeted(name, s.get("budgeted", {})),
                         dict(s.get("evaluations", {})))
                   for name, s in raw["studies"].items()]
        schedule = raw.get("schedule") or {"modes": [], "candidates": {"default": []}}
        protocol = cls(raw["base"], raw["experiments"], raw["stage1"], raw["stage2"], list(raw["seeds"]),
                       raw.get("save_dir", "runs/protocol"), studies, list(schedule["modes"]),
                       {k: [str(a) for a in v] for k, v in schedule["candidates"].items()}, raw.get("targets", {}),
                       list(raw.get("claims", [])))
        protocol.check()
        return protocol

    def mode_file(self, mode: str) -> str:
        return str(Path(self.experiments) / f"{mode}.yaml")

    def check(self) -> None:
        """Every file named exists, before hours of training start."""
        files = [self.base, self.stage1, self.stage2]
        files += [f for s in self.studies for f in s.files] + [self.mode_file(m) for s in self.studies for m in s.modes]
        files += [self.mode_file(m) for m in self.schedule_modes]
        missing = sorted({f for f in files if not Path(f).is_file()})
        if missing:
            raise FileNotFoundError(f"protocol names missing configs: {', '.join(missing)}")
        if not self.seeds:
            raise ValueError("protocol needs at least one seed")
        for study in self.studies:
            study.check()
        studies = {s.name: {name for name, _, _ in s.runs()} for s in self.studies}
        for claim in self.claims:
            forms = [f for f in CLAIM_FORMS if f in claim]
            runs = studies.get(claim.get("study"), set())
            if (len(forms) != 1 or CLAIM_FORMS[forms[0]] not in claim or claim.get("config") not in runs
                    or claim[forms[0]] not in runs or set(claim) - CLAIM_KEYS):
                raise ValueError(f"claim {claim} must name a study, two of its runs (config and beats / ties) and the "
                                 f"margin (by / within), and a tag or none (keys: {sorted(CLAIM_KEYS)}); the study's "
                                 f"runs: {sorted(runs)}")


def _budgeted(study: str, budgeted: dict) -> tuple[dict[str, str], dict[str, list[float]]]:
    """A study's ``budgeted`` entries -> (mode -> setting, mode -> its own budgets where it gives them)."""
    settings, budgets = {}, {}
    for mode, entry in budgeted.items():
        if isinstance(entry, str):
            settings[mode] = entry
        elif isinstance(entry, dict) and set(entry) == {"setting", "budgets"}:
            settings[mode], budgets[mode] = entry["setting"], [float(b) for b in entry["budgets"]]
        else:
            raise ValueError(f"study {study!r}: budgeted {mode!r} must be a dotted setting or {{setting: ..., "
                             f"budgets: [...]}}, got {entry!r}")
    return settings, budgets


def _cli_args(configs: list[str], folder: Path, seed: int, extra: list[str]) -> list[str]:
    """The CLI arguments of a run of ``configs`` with ``seed``, logging into ``folder``."""
    args = [a for c in configs for a in ("--config", str(Path(c).resolve()))]
    return args + [
        "--seed_everything", str(seed), "--data.init_args.shuffle_seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(folder.parent.parent.resolve()),
        "--trainer.logger.init_args.name", folder.parent.name,
        "--trainer.logger.init_args.version", folder.name, *extra,
    ]


def _fit(configs: list[str], folder: Path, seed: int, extra: list[str], test: bool, lock: int) -> float:
    """One training run (``fit``, then ``test`` when asked) into ``folder``, whose ``lock`` it holds
    too; -> wall seconds."""
    return _launch("fit", configs, folder, seed, [*extra, "--test_after_fit", str(test).lower()], lock)


def _test(configs: list[str], folder: Path, seed: int, extra: list[str], checkpoint: Path, lock: int) -> float:
    """One test of ``checkpoint``'s weights under ``configs`` into ``folder``; -> wall seconds."""
    return _launch("test", configs, folder, seed, [*extra, "--ckpt_path", str(checkpoint.resolve())], lock)


def _launch(subcommand: str, configs: list[str], folder: Path, seed: int, extra: list[str], lock: int) -> float:
    args = _cli_args(configs, folder, seed, extra)
    command = [sys.executable, "-m", "flexvlm", subcommand, *args, "--trainer.enable_progress_bar", "false"]
    print(f"[protocol] {folder}: {' '.join(command)}", flush=True)
    start = time.monotonic()
    code = run_command(command, str(folder / "protocol.log"), keep_open=(lock,))
    if code != 0:
        raise RuntimeError(f"run failed (exit {code}): see {folder / 'protocol.log'}")
    return time.monotonic() - start


def _record(configs: list[str], seed: int, extra: list[str], init: Path | None = None) -> dict:
    """What a run is given, which a finished run must match to be reused (``flexvlm.runs``): its
    configs' content, seed and extra arguments, and when the stage-1 weights it starts from were
    written (a retrained stage 1 retrains its stage 2)."""
    return {"configs": config_contents(configs), "seed": seed, "extra": extra,
            "init_written": written(init) if init is not None else None}


def _test_result(folder: Path) -> dict:
    """A tested run's accuracy and HR fraction (metrics.json), and its accuracy split by each tag of its
    answers (answers.jsonl; a dataset's ``tags``, e.g. the question kind), ``tag=value`` -> mean score."""
    metrics = json.loads((folder / "metrics.json").read_text())
    result = {"accuracy": metrics["test/accuracy"], "hr_fraction": metrics.get("test/hr_fraction")}
    scores: dict[str, list[float]] = {}
    with open(folder / "answers.jsonl") as f:
        for record in map(json.loads, f):
            for tag, value in record.get("tags", {}).items():
                scores.setdefault(f"{tag}={value}", []).append(record["score"])
    if scores:
        result["by_tag"] = {key: statistics.mean(values) for key, values in sorted(scores.items())}
    return result


def _last_value(folder: Path, column: str) -> float:
    """The last logged value of ``column`` in the run's CSVLogger metrics."""
    with open(folder / "metrics.csv") as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    if not values:
        raise RuntimeError(f"{folder / 'metrics.csv'} logged no {column}")
    return float(values[-1])


class NotFinished(Exception):
    """A run the protocol would train, where it is asked to report the finished runs only."""


class Runner:
    def __init__(self, protocol: Protocol, out: Path, finished_only: bool = False) -> None:
        """``finished_only``: report the runs that finished, train none (a protocol still running elsewhere)."""
        self.protocol, self.out, self.finished_only = protocol, out, finished_only
        self.save_dir = Path(protocol.save_dir)

    def _reuse_or_train(self, folder: Path, record: dict, label: str, train: Callable[[int], None]) -> None:
        if self.finished_only and not_reusable(folder, record, rerun=False, finished=DONE) is not None:
            raise NotFinished(label)
        reuse_or_train(folder, record, label, train, reuse=lambda: None, finished=DONE)

    def stage1(self, study: Study, seed: int) -> Path:
        """The stage-1 checkpoint of ``study`` and ``seed``, trained when missing."""
        folder = self.save_dir / study.name / STAGE1 / f"seed{seed}"
        ckpt = folder / "checkpoints" / "last.ckpt"
        configs = [self.protocol.base, *study.files, self.protocol.stage1]

        def train(lock: int) -> None:
            wall = _fit(configs, folder, seed, [], test=True, lock=lock)
            if not ckpt.is_file():
                raise RuntimeError(f"stage 1 left no {ckpt}: its config needs a ModelCheckpoint with save_last")
            (folder / DONE).write_text(json.dumps({"wall_s": wall}))

        self._reuse_or_train(folder, _record(configs, seed, []), f"[protocol] {study.name} stage 1 seed {seed}", train)
        return ckpt

    def stage2(self, study: Study, mode: str, seed: int, schedule: str, test: bool = True, name: str | None = None,
               settings: list[str] = ()) -> dict:
        """One stage-2 run from the stage-1 weights of its seed, trained when missing -> its row.
        ``name``: the run's (default: the mode's; ``mode@budget`` with the budget's ``settings``)."""
        p = self.protocol
        name = name or (mode if test else f"{mode}-{schedule}")
        folder = self.save_dir / study.name / name / f"seed{seed}"
        done = folder / DONE
        configs = [p.base, *study.files, p.mode_file(mode), p.stage2]
        init = self.stage1(study, seed)
        extra = [*p.candidates[schedule], *settings, "--model.init_from", str(init.resolve())]

        def train(lock: int) -> None:
            wall = _fit(configs, folder, seed, extra, test=test, lock=lock)
            result = {"wall_s": round(wall)}
            result |= _test_result(folder) if test else {"val_accuracy": _last_value(folder, "val/accuracy")}
            done.write_text(json.dumps(result))

        self._reuse_or_train(folder, _record(configs, seed, extra, init), f"[protocol] {study.name} {name} seed {seed}",
                             train)
        if test:
            self._count_cost(done, configs, folder, seed, [*p.candidates[schedule], *settings],
                              folder / "checkpoints" / "last.ckpt")
        return {"study": study.name, "config": name, "seed": seed, "schedule": schedule,
                **json.loads(done.read_text())}

    def evaluate(self, study: Study, name: str, mode: str, seed: int, schedule: str, settings: list[str]) -> dict:
        """A training-free method (``study.evaluations``): the weights of the stage-2 run of the mode it
        is tested from, same seed, tested under that mode's configs and its own -> its row."""
        p = self.protocol
        trained = study.evaluations[mode]
        self.stage2(study, trained, seed, schedule)
        source = self.save_dir / study.name / trained / f"seed{seed}" / "checkpoints" / "last.ckpt"
        folder = self.save_dir / study.name / name / f"seed{seed}"
        done = folder / DONE
        configs = [p.base, *study.files, p.mode_file(trained), p.stage2, p.mode_file(mode)]

        def test(lock: int) -> None:
            wall = _test(configs, folder, seed, list(settings), source, lock)
            done.write_text(json.dumps({"wall_s": round(wall), **_test_result(folder)}))

        self._reuse_or_train(folder, _record(configs, seed, list(settings), source),
                             f"[protocol] {study.name} {name} seed {seed} (tested from {trained})", test)
        self._count_cost(done, configs, folder, seed, list(settings), source)
        return {"study": study.name, "config": name, "seed": seed, "schedule": schedule,
                **json.loads(done.read_text())}

    @staticmethod
    def _count_cost(done: Path, configs: list[str], folder: Path, seed: int, extra: list[str],
                    checkpoint: Path) -> None:
        """The FLOPs and measured time of a generation per sample (``COSTS``), once per run (also for a
        run finished before)."""
        result = json.loads(done.read_text())
        if any(key not in result for key in COSTS):
            cli = build_quietly(_cli_args(configs, folder, seed, extra))
            cost = trained_cost(cli, checkpoint)
            result.update({key: cost[key] for key in COSTS})
            done.write_text(json.dumps(result))

    def choose_schedule(self) -> tuple[str, list[dict]]:
        """The candidate with the best mean final validation accuracy over the schedule modes."""
        p = self.protocol
        if len(p.candidates) == 1:
            return next(iter(p.candidates)), []
        study, seed = p.studies[0], p.seeds[0]
        rows = [self.stage2(study, mode, seed, name, test=False) for name in p.candidates for mode in p.schedule_modes]
        mean = {name: statistics.mean(r["val_accuracy"] for r in rows if r["schedule"] == name) for name in p.candidates}
        return max(mean, key=mean.get), rows

    def run(self) -> dict:
        p = self.protocol
        chosen, schedule_rows = self.choose_schedule()
        print(f"[protocol] stage-2 schedule: {chosen} {p.candidates[chosen]}", flush=True)
        rows = []
        for study in p.studies:
            for seed in study.seeds or p.seeds:
                try:
                    stage1 = self.stage1(study, seed)
                except NotFinished:
                    continue
                metrics = json.loads((stage1.parent.parent / "metrics.json").read_text())
                rows.append({"study": study.name, "config": STAGE1, "seed": seed, "schedule": "-",
                             "accuracy": metrics["test/accuracy"], "hr_fraction": None,
                             **json.loads((stage1.parent.parent / DONE).read_text())})
                for name, mode, settings in study.runs():
                    try:
                        rows.append(self.evaluate(study, name, mode, seed, chosen, settings) if mode in study.evaluations
                                    else self.stage2(study, mode, seed, chosen, name=name, settings=settings))
                    except NotFinished:
                        continue
        report = {"schedule": chosen, "schedule_rows": schedule_rows, "rows": rows, "summary": summarise(rows)}
        report["targets"] = check_targets(report["summary"], p.targets) if p.targets else []
        report["targets"] += check_claims(report["summary"], p.claims)
        self.write(report)
        return report

    def write(self, report: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        columns = ["study", "config", "seed", "schedule", "accuracy", "hr_fraction", *COSTS, "val_accuracy", "wall_s"]
        with open(self.out / "runs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(report["schedule_rows"] + report["rows"])
        (self.out / "results.md").write_text(markdown(report, self.protocol))
        # one line per method (a point per budget) against the budget, the FLOPs and the measured times
        axes = {"budget": ("accuracy_vs_budget.png", "share of the high-res tokens kept"),
                "mflops_per_sample": ("accuracy_vs_flops.png", COSTS["mflops_per_sample"]),
                "prefill_ms": ("accuracy_vs_prefill_time.png", COSTS["prefill_ms"]),
                "decode_ms": ("accuracy_vs_decode_time.png", COSTS["decode_ms"])}
        for axis, (picture, label) in axes.items():
            series: dict[str, list[tuple[float, float, float]]] = {}
            for (study, config), s in report["summary"].items():
                mode, _, budget = config.partition("@")  # a budgeted run is mode@budget
                x = (float(budget) if budget else None) if axis == "budget" else s[axis]
                if x is not None:
                    series.setdefault(f"{study}: {mode}", []).append((x, s["accuracy"], s["accuracy_std"]))
            if series:
                accuracy_lines_plot(series, f"test accuracy vs {label} (mean +- std over seeds)", x_label=label).save(
                    self.out / picture)
        print((self.out / "results.md").read_text(), flush=True)


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(study, config) -> mean and std (over seeds) of accuracy and HR fraction, and the seed count."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["config"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        acc = [r["accuracy"] for r in group]
        hr = [r["hr_fraction"] for r in group if r["hr_fraction"] is not None]
        costs = {key: [r[key] for r in group if r.get(key) is not None] for key in COSTS}
        tags = sorted({tag for r in group for tag in r.get("by_tag", {})})
        summary[key] = {
            "accuracy": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "hr_fraction": statistics.mean(hr) if hr else None, "seeds": len(group),
            **{key: statistics.mean(values) if values else None for key, values in costs.items()},
            "wall_s": statistics.mean(r["wall_s"] for r in group),
            "by_tag": {tag: statistics.mean(r["by_tag"][tag] for r in group if tag in r.get("by_tag", {}))
                       for tag in tags},
        }
    return summary


def check_targets(summary: dict[tuple[str, str], dict], targets: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets on the means of study ``targets['study']``, -> (target, measured, holds).
    ``targets`` names the configs: flex, random, center, xattn, hd, low_res, and the chance level."""
    study = targets.get("study", "main")

    def acc(role: str) -> float:
        return summary[(study, targets[role])]["accuracy"]

    chance = float(targets["chance"])
    flex, fraction = acc("flex"), summary[(study, targets["flex"])]["hr_fraction"] or 0.0
    checks = [
        ("flex (attention) uses <= 25 % of the HR tokens", f"{fraction:.3f}", fraction <= 0.25),
        ("flex >= 95 % of xattn", f"{flex:.3f} vs {acc('xattn'):.3f} ({flex / acc('xattn'):.0%})",
         flex >= 0.95 * acc("xattn")),
        ("flex >= 95 % of hd", f"{flex:.3f} vs {acc('hd'):.3f} ({flex / acc('hd'):.0%})", flex >= 0.95 * acc("hd")),
        ("attention beats random by >= 30 points", f"{flex:.3f} vs {acc('random'):.3f}",
         flex >= acc("random") + 0.30),
        ("attention beats center by >= 30 points", f"{flex:.3f} vs {acc('center'):.3f}",
         flex >= acc("center") + 0.30),
        ("lr_only within 10 points of chance", f"{acc('low_res'):.3f} (chance {chance:.2f})",
         abs(acc("low_res") - chance) <= 0.10),
        ("flex >= 50 points above chance", f"{flex:.3f}", flex >= chance + 0.50),
    ]
    return checks


CLAIM_FORMS = {"beats": "by", "ties": "within"}
CLAIM_KEYS = {"study", "config", "tag", *CLAIM_FORMS, *CLAIM_FORMS.values()}


def check_claims(summary: dict[tuple[str, str], dict], claims: list[dict]) -> list[tuple[str, str, bool | None]]:
    """Orderings on the means, -> (claim, measured, holds; None where a config did not run). A claim is
    ``{study, config, beats: other, by: margin}`` (config's accuracy >= other's + margin) or ``{study,
    config, ties: other, within: margin}`` (|difference| <= margin), on the answers of one tag
    (``tag: regions=3``) or on all (``tag: all``, the default; not ``on``, which YAML reads as true)."""
    checked = []
    for claim in claims:
        study, config, on = claim["study"], claim["config"], claim.get("tag", "all")
        form = next(f for f in CLAIM_FORMS if f in claim)
        other, margin = claim[form], float(claim[CLAIM_FORMS[form]])
        text = (f"{study}: {config} {form} {other} on {on} " + (f"by >= {margin:g}" if form == "beats"
                                                                 else f"within {margin:g}"))

        def accuracy(name: str) -> float | None:
            s = summary.get((study, name))
            return None if s is None else s["accuracy"] if on == "all" else s["by_tag"].get(on)

        a, b = accuracy(config), accuracy(other)
        if a is None or b is None:
            checked.append((text, "not run", None))
            continue
        holds = a >= b + margin if form == "beats" else abs(a - b) <= margin
        checked.append((text, f"{a:.3f} vs {b:.3f}", holds))
    return checked


def markdown(report: dict, protocol: Protocol) -> str:
    seeds = ", ".join(map(str, protocol.seeds)) + " (a study's own seeds where the table says fewer)"
    lines = [f"Stage-2 schedule: `{report['schedule']}` ({' '.join(protocol.candidates[report['schedule']]) or 'as in stage2'}).", ""]
    if report["schedule_rows"]:
        lines += ["Schedule choice (final val/accuracy, seed %d):" % protocol.seeds[0], "",
                  "| candidate | " + " | ".join(protocol.schedule_modes) + " | mean |", "|---" * (len(protocol.schedule_modes) + 2) + "|"]
        for name in protocol.candidates:
            vals = [r["val_accuracy"] for mode in protocol.schedule_modes for r in report["schedule_rows"]
                    if r["schedule"] == name and r["config"] == f"{mode}-{name}"]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {statistics.mean(vals):.3f} |")
        lines.append("")
    lines += [f"Test accuracy, mean +- std over seeds {seeds}:", "",
              "| study | config | accuracy | HR fraction | MFLOPs / sample | ms / sample to the first token "
              "| ms / sample a later token | wall s | seeds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (study, config), s in report["summary"].items():
        hr = "-" if s["hr_fraction"] is None else f"{s['hr_fraction']:.3f}"
        costs = " | ".join("-" if s[key] is None else f"{s[key]:.2f}" for key in COSTS)
        lines.append(f"| {study} | {config} | {s['accuracy']:.3f} +- {s['accuracy_std']:.3f} | {hr} | {costs} "
                     f"| {s['wall_s']:.0f} | {s['seeds']} |")
    lines += ["", "HR fraction: for flex and xattn, the share of the image's high-res tokens a selecting row attends "
              "to, mean over the layers that select (N_FA); for a reduction of hd (FastV, PyramidDrop, SparseVLM, "
              "VisionZip), the share of its image tokens a layer keeps, mean over every decoder layer (those before "
              "the first drop see all). They are budgets of different things; the FLOPs and times compare the costs."]
    tags = sorted({tag for s in report["summary"].values() for tag in s["by_tag"]})
    if tags:
        lines += ["", "Test accuracy by the answers' tags (mean over seeds):", "",
                  "| study | config | " + " | ".join(tags) + " |", "|---" * (len(tags) + 2) + "|"]
        for (study, config), s in report["summary"].items():
            cells = [f"{s['by_tag'][t]:.3f}" if t in s["by_tag"] else "-" for t in tags]
            lines.append(f"| {study} | {config} | " + " | ".join(cells) + " |")
    if report["targets"]:
        lines += ["", "| target | measured (means) | holds? |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for t, m, ok in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", help="the protocol YAML")
    parser.add_argument("--out", help="folder for runs.csv / results.md (default: <save_dir>)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds")
    parser.add_argument("--save_dir", help="override the protocol's run folder")
    parser.add_argument("--budgets", type=float, nargs="+",
                        help="run the budgeted modes only at these of their budgets (a first pass; a later run of all "
                             "reuses its runs)")
    parser.add_argument("--finished_only", action="store_true",
                        help="report the runs that finished and train none (a protocol still running elsewhere)")
    parser.add_argument("--studies", nargs="+", help="run only these studies (e.g. one process a study on a "
                                                     "machine with a core each; a later run of all reuses their runs)")
    args = parser.parse_args(argv)
    protocol = Protocol.load(args.protocol)
    if args.seeds:
        protocol.seeds = args.seeds
    if args.studies:
        unknown = sorted(set(args.studies) - {s.name for s in protocol.studies})
        if unknown:
            raise SystemExit(f"{args.protocol} has no studies {unknown}; it has {[s.name for s in protocol.studies]}")
        protocol.studies = [s for s in protocol.studies if s.name in args.studies]
    if args.save_dir:
        protocol.save_dir = args.save_dir
    if args.budgets:
        for study in protocol.studies:
            study.keep_budgets(args.budgets)
    return Runner(protocol, Path(args.out or protocol.save_dir), args.finished_only).run()


if __name__ == "__main__":
    main()
