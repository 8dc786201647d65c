"""flexvlm in lmms-eval (flexvlm/integrations): a tiny run trained here answers a TextVQA-format and a
V*-format set through lmms-eval's own command line, offline, from local copies of the data, and lmms-eval
scores what `python -m flexvlm test` scores on the same questions; then the adapter's requests one by one.

Needs the lmms extra: `make test` installs it (by hand: README, "Evaluating on benchmarks"); without it
these tests are skipped, except under CI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

if not os.environ.get("CI"):  # CI's `make test` installs the lmms extra: there, a missing lmms_eval fails
    pytest.importorskip("lmms_eval")

import datasets  # noqa: E402 (the lmms extra's, as lmms_eval)
from lmms_eval.api.instance import Instance  # noqa: E402
from test_checkpoints import HF_TEXT, hf  # noqa: E402, F401 (hf: a fixture, a random llava-hf folder)

from flexvlm.architectures import from_pretrained  # noqa: E402
from flexvlm.cli import main  # noqa: E402
from flexvlm.data.benchmark_datamodule import BenchmarkDataModule  # noqa: E402
from flexvlm.data.benchmarks import TextVQA  # noqa: E402
from flexvlm.data.image import CLIP_MEAN  # noqa: E402
from flexvlm.data.templates import VicunaV1Template  # noqa: E402
from flexvlm.models.generation import generate  # noqa: E402
from flexvlm.integrations import lmms_eval_vstar  # noqa: E402
from flexvlm.integrations.lmms_eval import FlexVLMLmms  # noqa: E402
from flexvlm.models.vlm import FlexVLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
# TextVQA's questions as lmms-eval's prompt writes them (it capitalizes the first letter, lowers the rest)
TEXTVQA = [  # question_id, question, the ten references, the answer the run is trained on (its VQA score)
    (1, "What brand is this?", ["nokia"] * 7 + ["nokia phone"] * 3, "nokia"),  # 1.0
    (2, "What is written on the sign?", ["stop"] * 2 + ["exit"] * 8, "stop"),  # 0.6
    (3, "What color is the car?", ["red"] * 10, "blue"),  # 0.0
]
VSTAR = [  # subset, file stem, question, options (the right one first, as the release lists them)
    ("direct_attributes", "sa_0", "What is the material of the bag?", ["leather", "cloth", "plastic", "paper"]),
    ("direct_attributes", "sa_1", "What is the color of the cup?", ["red", "blue", "green", "white"]),
    ("relative_position", "sa_9", "Is the dog on the left or right side of the car?", ["left", "right"]),
]
WORDS = sorted({w for _, q, refs, a in TEXTVQA for w in f"{q} {' '.join(refs)} {a}".split()}
               | {w for *_, q, opts in VSTAR for w in f"{q} {' '.join(opts)}".split()}
               | set(SHORT.split()) | {"USER:", "ASSISTANT:"})
SPECIALS = ["<unk>", "<s>", "</s>"]
ANSWER_LENGTH = 3  # max_new_tokens on both sides
LLM = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
MODEL = {
    "model": {"backbone": {"class_path": "flexvlm.models.vision.PatchMLPBackbone",
                           "init_args": {"image_size": 32, "patch_size": 8, "embed_dim": 24, "hidden_dim": 32}},
              "llm": "tiny", "llm_overrides": LLM, "mode": "flex", "num_sa_layers": 1},
    "lr": 3e-3, "warmup_ratio": 0.0, "max_new_tokens": ANSWER_LENGTH,
    "stop_strings": ["ASSISTANT:"],  # what lmms-eval's TextVQA task stops at
    "eval_loss": False,
}
BATCH = 2  # questions a batch on both sides, so that both pad the same prompts together
PROMPTS = [f"{q}\n{SHORT}" for _, q, _, _ in TEXTVQA]  # lmms-eval's TextVQA prompts


def _trainer(tmp: Path, version: str, **settings) -> dict:
    return {"accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp), "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp), "name": "run", "version": version}}, **settings}


def _config(path: Path, **sections) -> str:
    path.write_text(json.dumps({"seed_everything": 0, **sections}))  # JSON is YAML
    return str(path)


def _image(path: Path, seed: int, size: tuple[int, int]) -> bytes:
    """A noise picture saved as JPEG; its bytes, which the lmms-eval copy of the set holds too."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path.read_bytes()


def _save_tokenizer(vocabulary: list[str], folder: Path) -> None:
    """A word-level HF tokenizer.json: ids by hand, decodes by joining words with spaces."""
    tok = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def _parquet(rows: list[dict], path: Path) -> None:
    """Rows as lmms-eval's copies on the Hub hold them: the image as a datasets Image feature."""
    features = datasets.Dataset.from_list(rows).features
    features["image"] = datasets.Image()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The two sets in flexvlm's formats (TextVQA's JSON and image folder, V*'s release folders) and
    as local parquet copies of lmms-eval's textvqa / vstar-bench data; a word-level tokenizer; LLaVA
    training conversations on the same questions."""
    root = tmp_path_factory.mktemp("data")
    _save_tokenizer(SPECIALS + WORDS, root / "tokenizer")

    entries, rows, training = [], [], []
    for i, (qid, question, refs, trained) in enumerate(TEXTVQA):
        image = _image(root / "textvqa" / "images" / f"img{qid}.jpg", i, (30 + 6 * i, 40))
        entries.append({"question_id": qid, "image_id": f"img{qid}", "question": question, "answers": refs})
        rows.append({"question_id": str(qid), "image_id": f"img{qid}", "question": question, "answers": refs,
                     "image": {"bytes": image, "path": None}})
        training.append({"id": qid, "image": f"textvqa/images/img{qid}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}\n{SHORT}"}, {"from": "gpt", "value": trained}]})
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": entries}))
    _parquet(rows, root / "textvqa.parquet")

    rows = []
    for i, (subset, stem, question, options) in enumerate(VSTAR):
        image = _image(root / "vstar" / subset / f"{stem}.jpg", 10 + i, (40, 28 + 8 * i))
        (root / "vstar" / subset / f"{stem}.json").write_text(json.dumps({"question": question, "options": options}))
        lettered = "".join(f"\n({chr(65 + j)}) {o}" for j, o in enumerate(options))
        rows.append({"question_id": f"{subset}/{stem}", "category": subset, "label": "A",
                     "text": f"{question}{lettered}\n{LETTER}", "image": {"bytes": image, "path": None}})
    training.append({"id": "v", "image": "vstar/direct_attributes/sa_1.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{VSTAR[1][2]}"}, {"from": "gpt", "value": VSTAR[1][3][0]}]})
    _parquet(rows, root / "vstar.parquet")
    (root / "train.json").write_text(json.dumps(training))
    return {"root": root, "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> Path:
    """A flex run trained for a few steps on the questions: its folder (config.yaml, checkpoints/last.ckpt)."""
    tmp = tmp_path_factory.mktemp("runs")
    data = {"class_path": "flexvlm.data.datamodule.LlavaDataModule",
            "init_args": {"train_json": str(files["root"] / "train.json"), "image_folder": str(files["root"]),
                          "tokenizer_path": str(files["tokenizer"]), "batch_size": 4}}
    trainer = _trainer(tmp, "v", max_steps=40, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}])
    main(["fit", "--config", _config(tmp / "fit.yaml", trainer=trainer, model=MODEL, data=data)])
    return tmp / "run" / "v"


def _flexvlm_test(run: Path, files: dict, name: str, benchmark: dict) -> tuple[dict, list[dict]]:
    """``python -m flexvlm test`` of the run's checkpoint on a benchmark: metrics.json, answers.jsonl."""
    tmp = run.parents[1]
    data = {"class_path": "flexvlm.data.benchmark_datamodule.BenchmarkDataModule",
            "init_args": {"benchmark": benchmark, "tokenizer_path": str(files["tokenizer"]), "eval_batch_size": BATCH}}
    config = _config(tmp / f"{name}.yaml", trainer=_trainer(tmp, name), model=MODEL, data=data)
    main(["test", "--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    folder = tmp / "run" / name
    answers = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    return json.loads((folder / "metrics.json").read_text()), answers


@pytest.fixture(scope="module")
def flexvlm_scores(run, files) -> dict[str, tuple[dict, list[dict]]]:
    root = files["root"]
    textvqa = {"class_path": "flexvlm.data.benchmarks.TextVQA",
               "init_args": {"annotation_file": str(root / "textvqa" / "TextVQA_0.5.1_val.json"),
                             "image_dir": str(root / "textvqa" / "images")}}
    vstar = {"class_path": "flexvlm.data.benchmarks.VStar", "init_args": {"root": str(root / "vstar")}}
    return {"textvqa": _flexvlm_test(run, files, "textvqa", textvqa),
            "vstar": _flexvlm_test(run, files, "vstar", vstar)}


def _local_tasks(files: dict, folder: Path) -> Path:
    """Task YAMLs that take lmms-eval's textvqa_val and the shipped vstar_bench_likelihood as they are,
    but for the data: the local parquet copies, named relative to the YAML."""
    import lmms_eval.tasks

    folder.mkdir()
    for name in ("textvqa.parquet", "vstar.parquet"):
        shutil.copy(files["root"] / name, folder / name)
    textvqa_val = Path(lmms_eval.tasks.__file__).parent / "textvqa" / "textvqa_val.yaml"
    (folder / "textvqa_val_local.yaml").write_text(
        f"include: {textvqa_val}\ntask: textvqa_val_local\ndataset_path: parquet\n"
        "dataset_kwargs:\n  data_files:\n    validation: textvqa.parquet\n")
    (folder / "vstar_bench_likelihood_local.yaml").write_text(
        f"include: {ROOT / 'configs' / 'lmms_eval' / 'vstar_bench_likelihood.yaml'}\n"
        "task: vstar_bench_likelihood_local\ndataset_path: parquet\n"
        "dataset_kwargs:\n  data_files:\n    test: vstar.parquet\n")
    return folder


LOCAL_TASKS = ("textvqa_val_local", "vstar_bench_likelihood_local")


def _lmms_eval(run: Path, files: dict, tmp: Path, launcher: list[str], **env: str) -> dict:
    """lmms-eval's command line (``launcher``: how it is started, ``env`` its settings) with
    ``--model flexvlm`` on both local tasks, offline; what it wrote."""
    tasks = _local_tasks(files, tmp / "tasks")
    answers_file = tmp / "flexvlm_answers.jsonl"
    command = [*launcher, "--model", "flexvlm",
               "--model_args", f"pretrained={run},max_new_tokens={ANSWER_LENGTH},answers_file={answers_file}",
               "--include_path", str(tasks), "--tasks", ",".join(LOCAL_TASKS),
               "--batch_size", str(BATCH), "--device", "cpu", "--output_path", str(tmp / "out"), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), **env}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    # a failed evaluation can exit 0: what counts is the results file
    found = sorted((tmp / "out").rglob("*_results.json"))
    assert found, f"no results file; exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    samples = {task: [json.loads(line) for line in next((tmp / "out").rglob(f"*_samples_{task}.jsonl")).open()]
               for task in LOCAL_TASKS}
    answers = [json.loads(line) for file in sorted(tmp.glob("flexvlm_answers*.jsonl"))
               for line in file.read_text().splitlines()]
    return {"results": json.loads(found[-1].read_text()), "samples": samples, "log": result.stdout + result.stderr,
            "answers": answers}


@pytest.fixture(scope="module")
def lmms_run(run, files, tmp_path_factory) -> dict:
    """``python -m lmms_eval --model flexvlm`` on both local tasks: what it wrote."""
    return _lmms_eval(run, files, tmp_path_factory.mktemp("lmms"), [sys.executable, "-m", "lmms_eval"])


def test_lmms_eval_scores_textvqa_as_flexvlm_test(flexvlm_scores, lmms_run):
    metrics, records = flexvlm_scores["textvqa"]
    samples = sorted(lmms_run["samples"]["textvqa_val_local"], key=lambda s: s["doc_id"])
    # the same answers to the same questions, scored alike (VQA accuracy over the ten references)
    assert [(s["submission"]["question_id"], s["filtered_resps"]) for s in samples] == [
        (r["question_id"], r["answer"]) for r in records]
    assert [s["exact_match"] for s in samples] == pytest.approx([r["score"] for r in records])
    assert lmms_run["results"]["results"]["textvqa_val_local"]["exact_match,none"] == pytest.approx(
        metrics["test/accuracy"])
    assert 0 < metrics["test/accuracy"] < 1  # the trained answers score 1, 0.6 and 0: not a trivial match
    # each answer's fraction of high-res tokens, as flexvlm's answers.jsonl has it
    logged = [a for a in lmms_run["answers"] if a["task"] == "textvqa_val_local"]
    assert [a["answer"] for a in logged] == [r["answer"] for r in records]
    assert [a["hr_fraction"] for a in logged] == pytest.approx([r["hr_fraction"] for r in records], abs=1e-6)
    assert "flexvlm on textvqa_val_local: 3 questions, mean fraction of high-res tokens used" in lmms_run["log"]


def test_lmms_eval_scores_vstar_options_as_flexvlm_test(flexvlm_scores, lmms_run):
    metrics, records = flexvlm_scores["vstar"]
    samples = sorted(lmms_run["samples"]["vstar_bench_likelihood_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(records)  # in the order of the parquet rows: flexvlm's reading order
    for sample, record in zip(samples, records):
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]  # one (loss, greedy) pair an option
        assert losses == pytest.approx(record["losses"], abs=1e-5)
        assert (int(np.argmin(losses)) == 0) == record["correct"] and sample["acc"] == float(record["correct"])
    assert lmms_run["results"]["results"]["vstar_bench_likelihood_local"]["acc,none"] == pytest.approx(
        metrics["test/accuracy"])
    logged = [a for a in lmms_run["answers"] if a["task"] == "vstar_bench_likelihood_local"]
    assert [a["options"] for a in logged] == [opts for *_, opts in VSTAR]
    assert [a["hr_fraction"] for a in logged] == pytest.approx([r["hr_fraction"] for r in records], abs=1e-6)


def test_lmms_eval_finds_the_model_by_name_and_passes_its_arguments(lmms_run, run):
    config = lmms_run["results"]["config"]
    assert config["model"] == "flexvlm" and config["model_backend"].startswith(
        "flexvlm.integrations.lmms_eval.FlexVLMLmms")
    assert f"pretrained={run}" in config["model_args"]
    # max_new_tokens and answers_file reached the adapter: its file holds every answer, none longer
    answers = [a["answer"] for a in lmms_run["answers"] if "answer" in a]
    assert len(answers) == 3 and all(len(a.split()) <= ANSWER_LENGTH for a in answers)

    import lmms_eval.models

    assert lmms_eval.models.get_model("flexvlm") is FlexVLMLmms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_document(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r.get("task", ""), r["doc_id"]))


def _leaves(value) -> list:
    """The values in nested lists, tuples and dicts (each key before its value), in order, numbers
    written as text (lmms-eval's losses) read: what pytest.approx compares."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in [key, *_leaves(value[key])]]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    try:
        return [float(value)] if isinstance(value, str) else [value]
    except ValueError:
        return [value]


def test_two_processes_score_as_one(run, files, lmms_run, tmp_path):
    """lmms-eval on 2 CPU processes started by accelerate, as its README launches several: each
    process answers its share of the documents (lmms-eval pads the shorter share with copies), and
    lmms-eval gathers them. The same answers, losses and scores as one process; each answer once in
    the answers files (one a process), padding left out."""
    # `accelerate launch --cpu` starts one process whatever --num_processes says (several CPU
    # processes need MPI there); its multi-process launcher (--multi_gpu) on the CPU, with gloo, does
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(_free_port()), "-m", "lmms_eval"]
    two = _lmms_eval(run, files, tmp_path, launcher, ACCELERATE_USE_CPU="1")
    assert "Running on rank 1" in two["log"] and sorted(p.name for p in tmp_path.glob("flexvlm_answers*")) == [
        "flexvlm_answers.rank0.jsonl", "flexvlm_answers.rank1.jsonl"]
    for task in LOCAL_TASKS:
        assert two["results"]["results"][task] == pytest.approx(lmms_run["results"]["results"][task]), task
        for sample, alone in zip(*(_by_document(r["samples"][task]) for r in (two, lmms_run)), strict=True):
            assert sample["doc_id"] == alone["doc_id"]  # a response: an answer, or each option's (loss, greedy)
            assert _leaves(sample["filtered_resps"]) == pytest.approx(_leaves(alone["filtered_resps"]), abs=1e-5)
    answers = [_by_document(r["answers"]) for r in (two, lmms_run)]
    assert len(answers[0]) == len(answers[1]) == len(TEXTVQA) + len(VSTAR)
    assert _leaves(answers[0]) == pytest.approx(_leaves(answers[1]), abs=1e-5)


# -- the adapter's requests, in this process ---------------------------------------------------------


def _docs(files: dict) -> list[dict]:
    """lmms-eval's TextVQA documents from the parquet copy (decoded images)."""
    return list(datasets.load_dataset("parquet", data_files=str(files["root"] / "textvqa.parquet"), split="train"))


def _request(kind: str, doc_id: int, context: str, second, visual=lambda doc: [doc["image"]]) -> Instance:
    return Instance(request_type=kind, arguments=(context, second, visual, doc_id, "t", "s"), idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def adapter(run, files) -> FlexVLMLmms:
    lmm = FlexVLMLmms(pretrained=str(run), batch_size=3, device="cpu")
    lmm.task_dict = {"t": {"s": _docs(files)}}
    return lmm


def _flexvlm_tokens(files: dict, tokenizer_path: Path, model: FlexVLM, max_new_tokens: int) -> list[list[int]]:
    """``generate``'s tokens for the TextVQA set as flexvlm's own benchmark data asks it (its reader,
    prompts through LLaVA-1.5's template, its image preprocessing)."""
    root = files["root"] / "textvqa"
    data = BenchmarkDataModule(TextVQA(str(root / "TextVQA_0.5.1_val.json"), str(root / "images")),
                               str(tokenizer_path), image_size=model.image_size, eval_batch_size=len(TEXTVQA))
    data.setup("test")
    [batch] = list(data.test_dataloader())
    return generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch["content_box"],
                    max_new_tokens=max_new_tokens, eos_token_id=data.tokenizer.eos_id).tokens


def _generate(adapter: FlexVLMLmms, **gen_kwargs) -> list[str]:
    return adapter.generate_until([_request("generate_until", i, p, dict(gen_kwargs)) for i, p in enumerate(PROMPTS)])


def test_generate_until_answers_as_flexvlm_generates(adapter, files):
    expected = _flexvlm_tokens(files, files["tokenizer"], adapter.model, max_new_tokens=2)
    assert _generate(adapter, max_new_tokens=2) == [adapter.tokenizer.decode(t) for t in expected]


@pytest.fixture(scope="module")
def llava_folder(hf, tmp_path_factory) -> Path:  # noqa: F811 (hf: the fixture imported above)
    """A random LLaVA checkpoint in llava-hf's layout (config.json, weights), with a word-level
    tokenizer over its whole vocabulary: an untrained model's answers run to max_new_tokens."""
    folder = tmp_path_factory.mktemp("llava") / "llava-1.5"
    shutil.copytree(hf["root"] / "llava-hf", folder)
    fillers = [f"w{i}" for i in range(HF_TEXT["vocab_size"] - len(SPECIALS) - len(WORDS))]
    _save_tokenizer(SPECIALS + WORDS + fillers, folder)
    return folder


@pytest.fixture(scope="module")
def folder_adapter(llava_folder, files) -> FlexVLMLmms:
    lmm = FlexVLMLmms(pretrained=str(llava_folder), batch_size=3, device="cpu")
    lmm.task_dict = {"t": {"s": _docs(files)}}
    return lmm


def test_checkpoint_folder_loads_through_from_pretrained(folder_adapter, llava_folder, files):
    """A LLaVA folder is built by ``from_pretrained``, prompted with LLaVA-1.5's template and
    normalised as CLIP, and answers as flexvlm's own benchmark data and ``generate`` do."""
    model = from_pretrained(str(llava_folder)).eval()
    assert all(torch.equal(a, b) for a, b in zip(folder_adapter.model.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    assert (type(folder_adapter.template), tuple(folder_adapter.mean)) == (VicunaV1Template, CLIP_MEAN)
    expected = _flexvlm_tokens(files, llava_folder, model, max_new_tokens=3)
    assert _generate(folder_adapter, max_new_tokens=3) == [folder_adapter.tokenizer.decode(t) for t in expected]


def test_generate_until_honours_until_and_max_new_tokens_in_batches(folder_adapter):
    full = _generate(folder_adapter, max_new_tokens=3)
    assert all(len(a.split()) == 3 for a in full)  # untrained: no end token
    assert _generate(folder_adapter, max_new_tokens=1) == [a.split()[0] for a in full]
    assert [len(a.split()) for a in _generate(folder_adapter)] == [16] * 3  # no length set: the folder's default
    folder_adapter.batch_size = 1  # one question at a time: the same answers as three in a batch
    try:
        assert _generate(folder_adapter, max_new_tokens=3) == full
    finally:
        folder_adapter.batch_size = 3
    # each answer cut where its second word first shows, with a request of another length in the same call
    stops = [a.split()[1] for a in full]
    requests = [_request("generate_until", i, p, {"until": [stop], "max_new_tokens": 3})
                for i, (p, stop) in enumerate(zip(PROMPTS, stops, strict=True))]
    requests.append(_request("generate_until", 0, PROMPTS[0], {"max_new_tokens": 2, "until": "ASSISTANT:"}))
    assert folder_adapter.generate_until(requests) == [
        a[:a.index(stop)].strip() for a, stop in zip(full, stops, strict=True)] + [" ".join(full[0].split()[:2])]


def test_loglikelihood_of_options_and_of_a_task_target(adapter, files):
    prompt = PROMPTS[0]
    options = [" nokia", " stop", " red"]  # behind lmms-eval's target delimiter
    requests = [_request("loglikelihood", 0, prompt, o) for o in options]
    requests.insert(1, _request("loglikelihood", 2, prompt, lambda doc: "red"))  # another document between
    results = [result.text for result in adapter.loglikelihood(requests)]  # (loss, greedy) each
    assert all(greedy is False for _, greedy in results)
    first, other, *rest = [loss for loss, _ in results]
    assert all(loss > 0 for loss in (first, other, *rest))  # mean cross-entropies, lowest is best
    # the option scored with its question's other options, or alone: the same loss
    assert adapter.loglikelihood([requests[0]])[0].text[0] == pytest.approx(first, abs=1e-5)
    assert adapter.loglikelihood([requests[-1]])[0].text[0] == pytest.approx(rest[-1], abs=1e-5)


def test_requests_the_adapter_refuses(adapter, files, tmp_path):
    prompt = PROMPTS[0]
    with pytest.raises(ValueError, match="generates greedily"):
        adapter.generate_until([_request("generate_until", 0, prompt, {"temperature": 0.7})])
    two = _request("generate_until", 0, prompt, {}, visual=lambda doc: [doc["image"]] * 2)
    with pytest.raises(ValueError, match="has 2 images"):
        adapter.generate_until([two])
    with pytest.raises(NotImplementedError, match="multi-round"):
        adapter.generate_until_multi_round([two])
    with pytest.raises(ValueError, match="no automatic batch size"):
        FlexVLMLmms(pretrained=str(tmp_path), batch_size="auto")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        FlexVLMLmms(pretrained=str(tmp_path), dtype="fp8")
    with pytest.raises(FileNotFoundError, match="neither a flexvlm run"):
        FlexVLMLmms(pretrained=str(tmp_path))


def test_vstar_text_read_as_question_and_options():
    doc = {"question_id": "q", "label": "b", "text": "What is it?\n(A) a cup\n(B) a bag\n" + LETTER}
    assert lmms_eval_vstar.question(doc) == "What is it?"
    assert lmms_eval_vstar.options(doc) == ["a cup", "a bag"]
    assert lmms_eval_vstar.answer_index(doc) == 1
    inline = {**doc, "text": "What is it? (A) a cup (B) a bag"}
    assert lmms_eval_vstar.options(inline) == ["a cup", "a bag"]
    with pytest.raises(ValueError, match=r"question q: expected options \(A\), \(B\)"):
        lmms_eval_vstar.options({**doc, "text": "What is it? (B) a bag"})


def test_bfloat16_weights(adapter, run):
    """``dtype=bfloat16`` (a 7B model's on a GPU): the same answers from the trained run as in float32."""
    lmm = FlexVLMLmms(pretrained=str(run), batch_size=3, device="cpu", dtype="bfloat16")
    lmm.task_dict = adapter.task_dict
    assert {p.dtype for p in lmm.model.parameters()} == {torch.bfloat16}
    assert _generate(lmm, max_new_tokens=2) == _generate(adapter, max_new_tokens=2)
    request = _request("loglikelihood", 0, PROMPTS[0], " nokia")
    [half], [full] = lmm.loglikelihood([request]), adapter.loglikelihood([request])
    assert half.text[0] == pytest.approx(full.text[0], rel=0.05)
