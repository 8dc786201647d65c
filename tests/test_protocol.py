"""The two-stage protocol runner (flexvlm.protocol): its bookkeeping by hand-computed cases, and one
miniature protocol run end to end (a few steps per run)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from flexvlm import protocol as protocol_module
from flexvlm.protocol import Protocol, Runner, check_claims, check_targets, summarise

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic"


def test_the_shipped_protocols_name_existing_configs():
    protocol = Protocol.load(SYNTHETIC / "protocol" / "protocol.yaml")  # check() runs in load
    assert len(protocol.seeds) >= 3
    assert protocol.targets["study"] == protocol.studies[0].name
    axes = Protocol.load(SYNTHETIC / "protocol" / "axes.yaml")
    towers = {Path(f).stem for s in axes.studies for f in s.files if "/towers/" in f}
    sizes = {Path(f).stem for s in axes.studies for f in s.files if "/sizes/" in f}
    assert towers == {p.stem for p in (SYNTHETIC / "towers").glob("*.yaml")} and len(towers) >= 5
    assert sizes == {p.stem for p in (SYNTHETIC / "sizes").glob("*.yaml")} and len(sizes) >= 3
    architectures = Protocol.load(SYNTHETIC / "protocol" / "architectures.yaml")
    assert {Path(f).stem for s in architectures.studies for f in s.files if "/architectures/" in f} == {
        p.stem for p in (SYNTHETIC / "architectures").glob("*.yaml")}
    regions, regions_vit = Protocol.load(ROOT / "experiments" / "regions" / "protocol.yaml").studies
    assert regions.budgets == [0.025, 0.05, 0.1, 0.2, 0.4]
    assert set(regions.evaluations) == {"fastv", "sparsevlm", "sparsevlm_budget"}
    # lr_only, hd, xattn; seven budgeted methods at five budgets, random and center at three
    assert len(regions.runs()) == 3 + 7 * 5 + 2 * 3
    regions.keep_budgets([0.1, 0.4])
    assert [name for name, _, _ in regions.runs()][2:5] == ["flex_attention_ratio@0.1", "flex_attention_ratio@0.4",
                                                           "fastv@0.1"]
    assert len(regions.runs()) == 3 + 9 * 2
    assert set(regions_vit.evaluations) == {"visionzip", "fastv"} and len(regions_vit.runs()) == 1 + 3 * 5


def test_only_the_studies_asked_for_run(monkeypatch):
    ran = []
    monkeypatch.setattr(protocol_module.Runner, "run", lambda self: ran.append([s.name for s in self.protocol.studies]))
    protocol_module.main([str(SYNTHETIC / "protocol" / "architectures.yaml"), "--studies", "llava_onevision"])
    assert ran == [["llava_onevision"]]
    with pytest.raises(SystemExit, match=r"no studies \['llava'\]; it has \['smolvlm', 'llava_onevision'\]"):
        protocol_module.main([str(SYNTHETIC / "protocol" / "architectures.yaml"), "--studies", "llava"])


def test_protocol_errors_name_the_problem(tmp_path):
    raw = yaml.safe_load((SYNTHETIC / "protocol" / "protocol.yaml").read_text())
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**raw, "seed": [0]}))
    with pytest.raises(ValueError, match="unknown keys \\['seed'\\]"):
        Protocol.load(tmp_path / "typo.yaml")
    raw["studies"]["main"]["modes"].append("no_such_mode")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(FileNotFoundError, match="no_such_mode.yaml"):
        Protocol.load(tmp_path / "missing.yaml")


def _row(config, seed, accuracy, hr=None, wall=10, mflops=None):
    return {"study": "main", "config": config, "seed": seed, "accuracy": accuracy, "hr_fraction": hr,
            "wall_s": wall, "mflops_per_sample": mflops}


def test_summary_is_the_mean_and_sample_std_over_seeds():
    rows = [_row("flex", 0, 0.9, 0.1, 10, 2.0), _row("flex", 1, 0.8, 0.2, 20, 3.0), _row("flex", 2, 0.7, 0.15, 30, 4.0),
            _row("hd", 0, 1.0)]
    summary = summarise(rows)
    flex = summary[("main", "flex")]
    assert flex["accuracy"] == pytest.approx(0.8) and flex["accuracy_std"] == pytest.approx(0.1)
    assert flex["hr_fraction"] == pytest.approx(0.15) and flex["seeds"] == 3
    assert flex["wall_s"] == pytest.approx(20) and flex["mflops_per_sample"] == pytest.approx(3.0)
    assert summary[("main", "hd")] == {"accuracy": 1.0, "accuracy_std": 0.0, "hr_fraction": None, "seeds": 1,
                                       "mflops_per_sample": None, "prefill_ms": None, "decode_ms": None,
                                       "wall_s": 10, "by_tag": {}}
    timed = [{**_row("flex", seed, 0.5), "prefill_ms": ms, "decode_ms": ms / 10} for seed, ms in enumerate((2.0, 4.0))]
    assert summarise(timed)[("main", "flex")]["prefill_ms"] == pytest.approx(3.0)
    assert summarise(timed)[("main", "flex")]["decode_ms"] == pytest.approx(0.3)
    tagged = [{**_row("flex", 0, 0.5), "by_tag": {"kind=read": 0.4, "kind=relational": 0.6}},
              {**_row("flex", 1, 0.7), "by_tag": {"kind=read": 0.8}}]
    assert summarise(tagged)[("main", "flex")]["by_tag"] == pytest.approx({"kind=read": 0.6, "kind=relational": 0.6})


def test_targets_are_checked_on_the_means():
    names = {"flex": "f", "random": "r", "center": "c", "xattn": "x", "hd": "h", "low_res": "l", "chance": 0.1}
    means = {"f": (0.95, 0.125), "r": (0.64, 0.125), "c": (0.66, 0.125), "x": (1.0, None), "h": (0.99, None),
             "l": (0.21, None)}
    summary = {("main", k): {"accuracy": a, "hr_fraction": hr} for k, (a, hr) in means.items()}
    holds = {target: ok for target, _, ok in check_targets(summary, names)}
    assert holds == {
        "flex (attention) uses <= 25 % of the HR tokens": True,
        "flex >= 95 % of xattn": True,  # 0.95 >= 0.95 * 1.0
        "flex >= 95 % of hd": True,
        "attention beats random by >= 30 points": True,  # 0.95 >= 0.64 + 0.30
        "attention beats center by >= 30 points": False,  # 0.95 < 0.66 + 0.30
        "lr_only within 10 points of chance": False,  # |0.21 - 0.1| > 0.10
        "flex >= 50 points above chance": True,
    }


def test_claims_are_checked_on_the_means_of_a_tag_or_of_all():
    summary = {("s", "flex"): {"accuracy": 0.6, "by_tag": {"regions=3": 0.5, "regions=1": 0.8}},
               ("s", "fastv"): {"accuracy": 0.55, "by_tag": {"regions=3": 0.3, "regions=1": 0.84}}}
    claims = [{"study": "s", "config": "flex", "beats": "fastv", "tag": "regions=3", "by": 0.2},  # 0.5 >= 0.3 + 0.2
              {"study": "s", "config": "flex", "beats": "fastv", "by": 0.1},  # all: 0.6 < 0.55 + 0.1
              {"study": "s", "config": "flex", "ties": "fastv", "tag": "regions=1", "within": 0.05},  # |-0.04|
              {"study": "s", "config": "flex", "ties": "fastv", "tag": "regions=1", "within": 0.03},
              {"study": "s", "config": "flex", "beats": "sparsevlm", "by": 0.0}]  # not run
    assert [(measured, holds) for _, measured, holds in check_claims(summary, claims)] == [
        ("0.500 vs 0.300", True), ("0.600 vs 0.550", False), ("0.800 vs 0.840", True), ("0.800 vs 0.840", False),
        ("not run", None)]
    assert check_claims(summary, claims[:1])[0][0] == "s: flex beats fastv on regions=3 by >= 0.2"


def test_a_miniature_protocol_runs_both_stages_from_one_stage1_model(tmp_path):
    """One seed, two modes and a training-free one, a few steps each (four real runs: the default suite's
    budget): every stage-2 run starts from the stage-1 weights, and FastV is tested from hd's weights.
    (Each seed's own stage 1, and the schedule's choice on validation accuracy: the bookkeeping tests
    below.)"""
    last = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 2}}
    tiny = {"trainer": {"max_steps": 2, "val_check_interval": 2, "callbacks": [last], "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
            "data": {"init_args": {"num_train": 16, "num_val": 8, "num_test": 8, "batch_size": 8,
                                   "eval_batch_size": 8}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    stage2 = yaml.safe_load((SYNTHETIC / "protocol" / "stage2.yaml").read_text())
    stage2["trainer"] = tiny["trainer"]  # stage 2 stacks last: its budget must be the tiny one too
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    raw = yaml.safe_load((SYNTHETIC / "protocol" / "protocol.yaml").read_text())
    raw = {**raw, "seeds": [0], "save_dir": str(tmp_path / "runs"),
           "studies": {"main": {"files": [str(tmp_path / "tiny.yaml")], "modes": ["hd", "flex_attention_ratio", "fastv"],
                                "evaluations": {"fastv": "hd"}}},
           "schedule": None}
    raw = {k: str(ROOT / v) if k in ("base", "experiments", "stage1") else v for k, v in raw.items()}
    raw["stage2"] = str(tmp_path / "stage2.yaml")
    raw.pop("targets")
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(raw))
    runner = Runner(Protocol.load(tmp_path / "protocol.yaml"), tmp_path / "out")
    report = runner.run()

    runs = tmp_path / "runs" / "main"
    for seed in (0,):
        stage1 = torch.load(runs / "stage1" / f"seed{seed}" / "checkpoints" / "last.ckpt", weights_only=True)
        config = yaml.safe_load((runs / "hd" / f"seed{seed}" / "config.yaml").read_text())
        assert config["model"]["init_from"] == str((runs / "stage1" / f"seed{seed}" / "checkpoints" / "last.ckpt"))
        assert config["seed_everything"] == seed and config["data"]["init_args"]["shuffle_seed"] == seed
        model = config["model"]
        assert model["model"]["init_args"]["mode"] == "hd"
        assert model["aux_objective"]["init_args"]["grounding_weight"] == 0.0
        assert "k_hr_proj" not in " ".join(stage1["state_dict"])  # stage 1 is the low-res-only model
    rows = list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert [(r["config"], r["seed"]) for r in rows if r["accuracy"] and r["config"] != "stage1"] == [
        ("hd", "0"), ("flex_attention_ratio", "0"), ("fastv", "0")]
    fastv = yaml.safe_load((runs / "fastv" / "seed0" / "config.yaml").read_text())
    assert fastv["ckpt_path"] == str(runs / "hd" / "seed0" / "checkpoints" / "last.ckpt")
    assert fastv["model"]["model"]["init_args"]["reduction"]["class_path"] == "flexvlm.reduction.FastV"
    hr = json.loads((runs / "fastv" / "seed0" / "done.json").read_text())["hr_fraction"]
    assert hr == pytest.approx((1 + 2 * 0.125) / 3)  # all 144 HR tokens in layer 0, 18 in layers 1 and 2
    flex = json.loads((runs / "flex_attention_ratio" / "seed0" / "metrics.json").read_text())["test/accuracy"]
    assert report["summary"][("main", "flex_attention_ratio")]["accuracy"] == pytest.approx(flex)
    assert "| main | fastv |" in (tmp_path / "out" / "results.md").read_text()
    # FLOPs and measured time of a generation per sample, counted once per tested run and kept with its result
    for config in ("hd", "flex_attention_ratio", "fastv"):
        done = json.loads((runs / config / "seed0" / "done.json").read_text())
        assert done["mflops_per_sample"] > 0 and done["prefill_ms"] > 0 and done["decode_ms"] > 0
    assert all(float(r["mflops_per_sample"]) > 0 for r in rows if r["accuracy"] and r["config"] != "stage1")
    for picture in ("accuracy_vs_flops.png", "accuracy_vs_prefill_time.png", "accuracy_vs_decode_time.png"):
        assert Image.open(tmp_path / "out" / picture).size == (720, 480)
    # a second call reuses every finished run
    assert Runner(Protocol.load(tmp_path / "protocol.yaml"), tmp_path / "out").run()["rows"] == report["rows"]


def test_a_finished_run_is_reused_only_when_its_configs_and_stage1_weights_are_the_same(tmp_path, monkeypatch):
    """The bookkeeping alone, runs faked: a changed study config retrains stage 1, and a retrained
    stage 1 retrains the stage-2 run that starts from it; the old runs are kept aside."""
    trained, starts = [], {}

    def fake_fit(configs, folder, seed, extra, test, lock):
        trained.append(folder.relative_to(tmp_path / "runs").as_posix())
        starts[trained[-1]] = extra[extra.index("--model.init_from") + 1] if "--model.init_from" in extra else None
        (folder / "checkpoints").mkdir(exist_ok=True)
        torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")
        (folder / "metrics.csv").write_text("step,val/accuracy\n0,0.5\n")
        return 1.0

    monkeypatch.setattr(protocol_module, "_fit", fake_fit)
    study_file = tmp_path / "study.yaml"
    study_file.write_text("trainer: {max_steps: 2}\n")
    raw = yaml.safe_load((SYNTHETIC / "protocol" / "protocol.yaml").read_text())
    raw = {k: str(ROOT / v) if k in ("base", "experiments", "stage1", "stage2") else v for k, v in raw.items()}
    raw |= {"save_dir": str(tmp_path / "runs"), "studies": {"main": {"files": [str(study_file)], "modes": ["xattn"]}}}
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(raw))
    runner = Runner(Protocol.load(tmp_path / "protocol.yaml"), tmp_path / "out")

    runner.stage2(runner.protocol.studies[0], "xattn", 0, "lr1e-3", test=False)
    runner.stage2(runner.protocol.studies[0], "xattn", 0, "lr1e-3", test=False)
    assert trained == ["main/stage1/seed0", "main/xattn-lr1e-3/seed0"]  # the second call reused both
    study_file.write_text("trainer: {max_steps: 3}\n")
    runner.stage2(runner.protocol.studies[0], "xattn", 0, "lr1e-3", test=False)
    assert trained[2:] == ["main/stage1/seed0", "main/xattn-lr1e-3/seed0"]
    assert (tmp_path / "runs" / "main" / "stage1" / "seed0.old1" / "done.json").is_file()
    runner.stage2(runner.protocol.studies[0], "xattn", 1, "lr1e-3", test=False)  # another seed: its own stage 1
    assert trained[4:] == ["main/stage1/seed1", "main/xattn-lr1e-3/seed1"]
    assert starts["main/xattn-lr1e-3/seed1"] == str(tmp_path / "runs" / "main" / "stage1" / "seed1" / "checkpoints"
                                                     / "last.ckpt")


def test_budgets_and_training_free_evaluations_run_as_the_study_says(tmp_path, monkeypatch):
    """Runs faked: a budgeted mode trains once per budget (the study's, or its own) with the budget in
    its own setting; a training-free mode is tested, per seed, from the weights of that seed's run of the mode it names,
    under that mode's configs and its own; every tested run's accuracy is split by its answers' tags."""
    launched = []

    def fake_launch(subcommand, configs, folder, seed, extra, lock):
        launched.append((subcommand, folder.relative_to(tmp_path / "runs").as_posix(), [Path(c).stem for c in configs],
                         extra))
        fast = "3e-3" in extra  # the schedule candidate that learns
        (folder / "metrics.csv").write_text(f"step,val/accuracy\n1,0.2\n2,{0.9 if fast else 0.1}\n")
        (folder / "checkpoints").mkdir(exist_ok=True)
        torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")
        (folder / "metrics.json").write_text(json.dumps({"test/accuracy": 0.5, "test/hr_fraction": 0.1}))
        answers = [{"question_id": str(i), "score": float(i % 2), "tags": {"kind": "read" if i < 2 else "relational"}}
                   for i in range(4)]
        (folder / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        return 1.0

    monkeypatch.setattr(protocol_module, "_launch", fake_launch)
    monkeypatch.setattr(Runner, "_count_cost", staticmethod(lambda *args: None))
    raw = yaml.safe_load((SYNTHETIC / "protocol" / "protocol.yaml").read_text())
    raw = {k: str(ROOT / v) if k in ("base", "experiments", "stage1", "stage2") else v for k, v in raw.items()}
    raw.pop("targets")
    schedule = {"modes": ["flex_attention_ratio"], "candidates": {"slow": ["--model.lr", "1e-9"],
                                                                  "fast": ["--model.lr", "3e-3"]}}
    raw |= {"save_dir": str(tmp_path / "runs"), "seeds": [0, 1], "schedule": schedule, "studies": {"main": {
        "modes": ["hd", "flex_attention_ratio", "flex_center_ratio", "flex_random_ratio"], "budgets": [0.05, 0.2],
        "budgeted": {"flex_attention_ratio": "model.model.init_args.selection.init_args.ratio",
                     "flex_center_ratio": {"setting": "model.model.init_args.selection.init_args.ratio",
                                           "budgets": [0.1]}},
        "evaluations": {"flex_random_ratio": "hd"}}}}
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(raw))
    report = Runner(Protocol.load(tmp_path / "protocol.yaml"), tmp_path / "out").run()

    tests = [(folder, configs, extra) for command, folder, configs, extra in launched if command == "test"]
    hd_weights = str((tmp_path / "runs" / "main" / "hd" / "seed1" / "checkpoints" / "last.ckpt").resolve())
    assert tests[1] == ("main/flex_random_ratio/seed1", ["synthetic", "hd", "stage2", "flex_random_ratio"],
                        ["--ckpt_path", hd_weights])
    fits = {folder: extra for command, folder, _, extra in launched if command == "fit"}
    # the schedule: the candidate of the best final val/accuracy (seed 0, its modes), then every run's
    assert report["schedule"] == "fast" and {r["config"] for r in report["schedule_rows"]} == {
        "flex_attention_ratio-slow", "flex_attention_ratio-fast"}
    assert set(fits) == {f"main/{run}/seed{s}" for s in (0, 1) for run in
                         ("stage1", "hd", "flex_attention_ratio@0.05", "flex_attention_ratio@0.2",
                          "flex_center_ratio@0.1")} | {"main/flex_attention_ratio-slow/seed0",
                                                       "main/flex_attention_ratio-fast/seed0"}
    assert all(extra[:2] == ["--model.lr", "3e-3"] for folder, extra in fits.items()
               if "stage1" not in folder and not folder.endswith(("-slow/seed0", "-fast/seed0")))
    budget = fits["main/flex_attention_ratio@0.2/seed1"]
    assert budget[budget.index("--model.model.init_args.selection.init_args.ratio") + 1] == "0.2"
    assert [r["config"] for r in report["rows"] if r["seed"] == 0] == [
        "stage1", "hd", "flex_attention_ratio@0.05", "flex_attention_ratio@0.2", "flex_center_ratio@0.1",
        "flex_random_ratio"]
    assert report["summary"][("main", "flex_random_ratio")]["by_tag"] == {"kind=read": 0.5, "kind=relational": 0.5}
    assert "| main | flex_random_ratio | 0.500 | 0.500 |" in (tmp_path / "out" / "results.md").read_text()
    assert Image.open(tmp_path / "out" / "accuracy_vs_budget.png").size == (720, 480)

    launched.clear()  # a report of the finished runs only trains nothing, and leaves out a mode not run
    raw["studies"]["main"]["modes"].append("xattn")
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(raw))
    report = Runner(Protocol.load(tmp_path / "protocol.yaml"), tmp_path / "out2", finished_only=True).run()
    assert launched == [] and len(report["rows"]) == 2 * 6 and "xattn" not in {r["config"] for r in report["rows"]}


def test_a_study_that_tests_a_budgeted_or_unknown_mode_is_refused(tmp_path):
    raw = yaml.safe_load((SYNTHETIC / "protocol" / "protocol.yaml").read_text())
    raw["studies"]["main"] |= {"evaluations": {"flex_random_ratio": "nowhere"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="flex_random_ratio is tested from 'nowhere'"):
        Protocol.load(tmp_path / "bad.yaml")
    raw["studies"]["main"] |= {"evaluations": {}, "budgets": [0.1]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="budgets and budgeted go together"):
        Protocol.load(tmp_path / "bad.yaml")
    raw["studies"]["main"].pop("budgets")
    for claim in ({"study": "main", "config": "flex_attention_ratio", "beats": "fastv", "by": 0.1},
                  {"study": "main", "config": "flex_attention_ratio", "beats": "hd", "by": 0.1, True: "regions=1"}):
        raw["claims"] = [claim]  # a run the study lacks; YAML's `on:`, read as true
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError, match="must name a study, two of its runs"):
            Protocol.load(tmp_path / "bad.yaml")
    raw.pop("claims")
    raw["studies"]["main"] |= {"budgeted": {"flex_random_ratio": {"setting": "model.model.init_args.selection"}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="must be a dotted setting or"):
        Protocol.load(tmp_path / "bad.yaml")
