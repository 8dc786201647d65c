"""Evaluation protocols on tiny benchmark files in the released formats: scores against values
worked out by hand (or by a naive loop), and `python -m flexvlm test` / `predict` end to end."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_benchmarks import _image, _json, _rsvqa, _vstar
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

from flexvlm.cli import main
from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.benchmark_datamodule import BenchmarkDataModule, load_preprocessed
from flexvlm.data.benchmarks import RSVQAHR, BenchmarkReader, LlavaQuestions, MagnifierBench, TextVQA, VStar
from flexvlm.data.collate import sample_conversation
from flexvlm.data.templates import PlainTemplate
from flexvlm.evaluation import ExactMatch, GenerationVQA, LetterChoice, LikelihoodChoice, YesNo
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["what", "brand", "is", "this?", "written", "on", "the", "sign?", "nokia", "phone", "stop", "exit",
         "yes", "no", "cat", "A", "B", "C", "D", "red", "blue", "USER:", "ASSISTANT:"]
SPECIALS = ["<unk>", "<s>", "</s>"]
LLM = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level HF tokenizer.json: ids by hand, decodes by joining words with spaces."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tok = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _textvqa(root: Path) -> dict:
    _image(root / "images" / "img1.jpg")
    _image(root / "images" / "img2.jpg")
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 1, "image_id": "img1", "question": "what brand is this?",
         "answers": ["nokia"] * 7 + ["nokia phone"] * 3},
        {"question_id": 2, "image_id": "img2", "question": "what is written on the sign?",
         "answers": ["stop"] * 2 + ["exit"] * 8},
    ]})
    return {"annotation_file": str(root / "TextVQA_0.5.1_val.json"), "image_dir": str(root / "images")}


def _magnifierbench(root: Path) -> dict:
    _image(root / "images" / "1.png")
    _json(root / "magnifier.json", [
        {"id": "m1", "image": "images/1.png", "question": "What colour is the kite?",
         "options": ["red", "blue", "yellow", "green"], "answer": "C"},
        {"id": "m2", "image": "images/1.png", "question": "Is it day?", "options": ["yes", "no"], "answer": "B"},
        {"id": "m3", "image": "images/1.png", "instruction": "How many birds? A. 1, B. 2", "answer": "B"},
    ])
    return {"annotation_file": str(root / "magnifier.json")}


def _llava_questions(root: Path) -> dict:
    _image(root / "img" / "a.jpg")
    lines = [{"question_id": 1, "image": "a.jpg", "text": "What is it?", "answer": "cat"},
             {"question_id": 2, "image": "a.jpg", "text": "Which?", "answers": ["x", "y"]}]
    (root / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"question_file": str(root / "q.jsonl"), "image_dir": str(root / "img")}


def _batch(tokenizer_dir: Path, benchmark: BenchmarkReader, template=None) -> tuple[dict, BenchmarkDataModule]:
    """The benchmark's whole test split as one batch, through the datamodule's own loader."""
    data = BenchmarkDataModule(benchmark, str(tokenizer_dir), template=template, image_size=96,
                               eval_batch_size=8)
    data.setup("test")
    [batch] = list(data.test_dataloader())
    return batch, data


def _stub(data: BenchmarkDataModule, answers: list[str]) -> SimpleNamespace:
    """A stand-in LightningModule whose greedy answers are given."""
    fraction = torch.linspace(0.1, 0.3, len(answers))
    return SimpleNamespace(tokenizer=data.tokenizer, answer=lambda batch: (answers, fraction, {}))


def _tiny_model() -> FlexVLM:
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32)
    return FlexVLM(backbone, llm="tiny", llm_overrides=LLM, mode="flex", num_sa_layers=1).eval()


def test_generation_vqa_soft_accuracy(tmp_path, tokenizer_dir):
    batch, data = _batch(tokenizer_dir, TextVQA(**_textvqa(tmp_path)))
    assert isinstance(data.protocol, GenerationVQA)
    scored = data.protocol.score(_stub(data, ["Nokia", "stop"]), batch)
    # 7 of 10 match: every leave-one-out subset keeps >= 3 matches -> 1. 2 of 10 match: the 2
    # subsets without a match keep 1 (1/3), the 8 others keep 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert [r["score"] for r in scored.records] == pytest.approx([1.0, 0.6])
    assert float(data.protocol.compute()["accuracy"]) == pytest.approx(0.8)
    first = scored.records[0]
    assert first["question_id"] == "1" and first["answer"] == "Nokia"
    assert first["prompt"] == "<image>\nwhat brand is this?\nAnswer the question using a single word or phrase."
    assert first["hr_fraction"] == pytest.approx(0.1) and len(first["references"]) == 10
    # the prompt went through the chat template (Vicuna v1 by default), up to where the reply starts
    ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    vocab = SPECIALS + WORDS
    assert ids[0] == vocab.index("<s>") and ids[-1] == vocab.index("ASSISTANT:") and vocab.index("USER:") in ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_letter_choice_parses_the_generated_letter(tmp_path, tokenizer_dir):
    batch, data = _batch(tokenizer_dir, MagnifierBench(**_magnifierbench(tmp_path)))
    assert isinstance(data.protocol, LetterChoice)
    # "C" is C (right); "(A)" picks A, the answer is B; "2" is no letter but the text of option B
    scored = data.protocol.score(_stub(data, ["C", "The answer is (A) no.", "2"]), batch)
    assert [(r["choice"], r["reference"], r["correct"]) for r in scored.records] == [
        ("C", "C", True), ("A", "B", False), ("B", "B", True)]
    assert float(data.protocol.compute()["accuracy"]) == pytest.approx(2 / 3)


def test_yes_no_per_question_type(tmp_path, tokenizer_dir):
    _rsvqa(tmp_path)
    batch, data = _batch(tokenizer_dir, RSVQAHR(str(tmp_path), qtypes=None))
    assert isinstance(data.protocol, YesNo) and batch["qtype"] == ["presence", "comparison", "count"]
    # references yes / no / 12: the first word of "Yes, there is." is yes; "yes" is not no
    scored = data.protocol.score(_stub(data, ["Yes, there is.", "yes", "12"]), batch)
    assert [r["correct"] for r in scored.records] == [True, False, True]
    scores = {k: float(v) for k, v in data.protocol.compute().items()}
    assert scores == pytest.approx({"accuracy/presence": 1.0, "accuracy/comparison": 0.0, "accuracy/count": 1.0,
                                    "accuracy": 2 / 3})


def test_exact_match_against_the_first_reference(tmp_path, tokenizer_dir):
    batch, data = _batch(tokenizer_dir, LlavaQuestions(**_llava_questions(tmp_path)))
    protocol = ExactMatch()
    # "A cat." normalises to "cat"; "y" is a reference, but not the first one
    scored = protocol.score(_stub(data, ["A cat.", "y"]), batch)
    assert [(r["reference"], r["correct"]) for r in scored.records] == [("cat", True), ("x", False)]
    assert float(protocol.compute()["accuracy"]) == pytest.approx(0.5)


def _naive_option_loss(model: FlexVLM, data: BenchmarkDataModule, item, option: str) -> float:
    """One question and one option in a forward pass of their own; the labels are spliced by the model."""
    sample = {"question": item.prompt, "answer": option}
    ids, labels = data.template.encode(sample_conversation(sample), data.tokenizer)
    pixels = load_preprocessed(item.image_path, 96, data.hparams.mean, data.hparams.std)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    images, box = pixels["image"][None], pixels["content_box"][None]
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), images, box, labels=labels).logits
        spliced = model.prepare(ids, torch.ones_like(ids), images, box, labels=labels).labels
    answer = spliced[0, 1:] != IGNORE_INDEX
    return float(F.cross_entropy(logits[0, :-1][answer], spliced[0, 1:][answer]))


def test_likelihood_choice_matches_one_forward_per_option(tmp_path, tokenizer_dir):
    _vstar(tmp_path)
    batch, data = _batch(tokenizer_dir, VStar(str(tmp_path)), template=PlainTemplate())
    assert isinstance(data.protocol, LikelihoodChoice) and [len(o) for o in batch["options"]] == [4, 4, 2]
    model = _tiny_model()
    module = SimpleNamespace(model=model, tokenizer=data.tokenizer, collator=data.collator)
    with torch.no_grad():
        scored = data.protocol.score(module, batch)

    items = data.splits["test"].items
    naive = [[_naive_option_loss(model, data, item, o) for o in item.options] for item in items]
    choices = [min(range(len(losses)), key=losses.__getitem__) for losses in naive]
    for record, losses, choice, item in zip(scored.records, naive, choices, items):
        assert record["losses"] == pytest.approx(losses, abs=1e-4)
        assert (record["choice"], record["answer"]) == (choice, item.options[choice])
        assert record["correct"] == (choice == 0) and 0.0 < record["hr_fraction"] <= 1.0
    assert float(data.protocol.compute()["accuracy"]) == pytest.approx(sum(c == 0 for c in choices) / 3)
    assert set(scored.masks) == {1, 2} and scored.masks[1].shape == (3, 12, 12)


def _reader(name: str, init_args: dict) -> str:
    """A benchmark reader as a command-line value."""
    return json.dumps({"class_path": f"flexvlm.data.benchmarks.{name}", "init_args": init_args})


def test_reader_arguments_are_typed_and_typos_list_the_valid_names(capsys):
    paper = ROOT / "experiments" / "paper" / "llava-1.5-7b-flexattn.yaml"
    base = ["test", "--config", str(paper), "--config", str(ROOT / "configs" / "benchmarks" / "textvqa.yaml")]
    with pytest.raises(SystemExit):
        main([*base, "--data.init_args.benchmark.init_args.annotation", "a.json"])
    err = capsys.readouterr().err
    assert "valid names here: annotation_file, image_dir" in err and "did you mean 'annotation_file'" in err
    rsvqa = ROOT / "configs" / "benchmarks" / "rsvqa_hr.yaml"
    with pytest.raises(SystemExit):
        main(["test", "--config", str(paper), "--config", str(rsvqa), "--data.init_args.benchmark.init_args.qtypes",
              "7"])
    assert "qtypes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["textvqa", "vstar", "magnifierbench", "rsvqa_hr"])
def test_shipped_benchmark_yaml_stacks_on_the_paper_model(name, capsys):
    paper = ROOT / "experiments" / "paper" / "llava-1.5-7b-flexattn.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(paper), "--config", str(ROOT / "configs" / "benchmarks" / f"{name}.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    reader = {"textvqa": "TextVQA", "vstar": "VStar", "magnifierbench": "MagnifierBench", "rsvqa_hr": "RSVQAHR"}[name]
    assert f"class_path: flexvlm.data.benchmarks.{reader}" in out and "class_path: flexvlm.models.vlm.FlexVLM" in out


def _tiny_run_config(tmp_path: Path) -> Path:
    """The tiny flex model on the CPU, its runs in tmp_path/run/v."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "strategy": "auto", "default_root_dir": str(tmp_path),
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "run", "version": "v"}},
            "callbacks": [{"class_path": "flexvlm.visualize.SelectionPictures"}],
        },
        "model": {"model": {
            "backbone": {"class_path": "flexvlm.models.vision.PatchMLPBackbone",
                         "init_args": {"image_size": 32, "patch_size": 8, "embed_dim": 24, "hidden_dim": 32}},
            "llm": "tiny", "llm_overrides": LLM, "mode": "flex", "num_sa_layers": 1}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_cli_test_then_predict_on_a_shipped_benchmark_config(tmp_path, tokenizer_dir):
    """configs/benchmarks/textvqa.yaml after the tiny model, its paths overridden, untrained weights."""
    reader_args = _textvqa(tmp_path / "textvqa")
    args = ["--config", str(_tiny_run_config(tmp_path)),
            "--config", str(ROOT / "configs" / "benchmarks" / "textvqa.yaml"), "--trainer.strategy", "auto", "--data.init_args.benchmark", _reader("TextVQA", reader_args),
            "--data.init_args.tokenizer_path", str(tokenizer_dir), "--data.init_args.image_size", "96",
            "--data.init_args.num_workers", "0", "--model.max_new_tokens", "3"]
    main(["test", *args])
    run = tmp_path / "run" / "v"
    records = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["1", "2"]
    assert {"question_id", "prompt", "answer", "hr_fraction", "references", "score"} <= set(records[0])
    assert records[0]["prompt"].startswith("<image>\nwhat brand is this?")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"test/accuracy", "test/hr_fraction", "num_questions", "num_skipped"}  # eval_loss: false
    assert (metrics["num_questions"], metrics["num_skipped"]) == (2, 0)
    assert metrics["test/accuracy"] == pytest.approx(sum(r["score"] for r in records) / 2)
    assert metrics["test/hr_fraction"] == pytest.approx(sum(r["hr_fraction"] for r in records) / 2, abs=1e-6)
    assert (run / "selections.png").is_file()

    main(["predict", *args, "--trainer.callbacks+=flexvlm.visualize.PredictionPictures"])
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    # greedy answers of the same weights: the same as in the test run
    assert [(p["question_id"], p["answer"]) for p in predictions] == [(r["question_id"], r["answer"]) for r in records]
    for p in predictions:
        assert (run / p["picture"]).is_file()
    assert sorted(f.name for f in (run / "predictions").iterdir()) == ["1.png", "2.png"]


def test_cli_test_in_two_processes_answers_each_question_once(tmp_path, tokenizer_dir):
    """Three questions over two DDP processes: shards of 2 and 1, no question repeated to even them,
    and means over all three (Lightning's own synced mean gets uneven shards wrong)."""
    reader_args = _textvqa(tmp_path / "textvqa")
    data = json.loads(Path(reader_args["annotation_file"]).read_text())
    data["data"].append({**data["data"][0], "question_id": 3})
    Path(reader_args["annotation_file"]).write_text(json.dumps(data))
    command = [sys.executable, "-m", "flexvlm", "test", "--config", str(_tiny_run_config(tmp_path)),
               "--config", str(ROOT / "configs" / "benchmarks" / "textvqa.yaml"), "--trainer.devices", "2",
               "--data.init_args.benchmark", _reader("TextVQA", reader_args), "--data.init_args.tokenizer_path",
               str(tokenizer_dir), "--data.init_args.image_size", "96", "--data.init_args.num_workers", "0",
               "--data.init_args.eval_batch_size", "1", "--model.max_new_tokens", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run" / "v"
    records = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in records) == ["1", "2", "3"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_questions"] == 3
    assert metrics["test/accuracy"] == pytest.approx(sum(r["score"] for r in records) / 3)
    assert metrics["test/hr_fraction"] == pytest.approx(sum(r["hr_fraction"] for r in records) / 3, abs=1e-6)
