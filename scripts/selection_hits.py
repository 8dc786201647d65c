"""Where a trained flex model looks on the built-in task: for each FA layer, how often the high-res
tokens selected for the answer contain the tile asked about, and the accuracy, under several
selection strategies applied to the same checkpoint.

    python scripts/selection_hits.py experiments/synthetic/flex_attention_ratio.yaml \
        runs/synthetic/flex_attention_ratio/sweep/checkpoints/last.ckpt --num 500

Any further arguments go to the CLI (e.g. ``--data.init_args.fine_print true`` to test on the
task variant the checkpoint was trained on).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from flexvlm.cli import main as cli_main
from flexvlm.models.generation import generate
from flexvlm.selection import AllSelection, AttentionSelection, RandomSelection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="the training YAML (stacked on configs/synthetic.yaml)")
    parser.add_argument("checkpoint")
    parser.add_argument("--num", type=int, default=500, help="test questions to look at")
    args, overrides = parser.parse_known_args()
    with warnings.catch_warnings():  # LightningCLI warns that this script has its own argv
        warnings.simplefilter("ignore")
        cli = cli_main(["--config", "configs/synthetic.yaml", "--config", args.experiment,
                        "--trainer.logger.init_args.version", "selection_hits",
                        "--data.init_args.num_test", str(args.num), "--data.init_args.eval_batch_size", str(args.num),
                        *overrides],
                       run=False)
    cli.model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    data = cli.datamodule
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    queried = [data.splits["test"].scene(i).query for i in range(args.num)]
    model = cli.model.model.eval()
    print("| strategy | accuracy | HR fraction | queried tile selected, per FA layer |\n|---|---|---|---|")
    for name, strategy in [("as trained", model.selection), ("attention top-1 block", AttentionSelection(top_k=1)),
                           ("random, 2 blocks", RandomSelection(top_k=2, seed=0)), ("all", AllSelection())]:
        model.selection = strategy
        out = generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], max_new_tokens=1)
        answers = [data.tokenizer.decode(t) for t in out.tokens]
        accuracy = sum(a == refs[0] for a, refs in zip(answers, batch["answers"])) / args.num
        hits = {layer: sum(bool(m[i, t.row, t.col]) for i, t in enumerate(queried)) / args.num
                for layer, m in out.prefill_masks.items()}
        layers = ", ".join(f"layer {layer}: {hit:.2f}" for layer, hit in hits.items())
        print(f"| {name} | {accuracy:.3f} | {float(out.hr_fraction.mean()):.3f} | {layers} |")


if __name__ == "__main__":
    main()
