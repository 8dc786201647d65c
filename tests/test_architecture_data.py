"""SmolVLM- and LLaVA-OneVision-shaped models on the built-in task through flexvlm's data pipeline: the
architecture's image processor (``VisualEncoder.image_processor``) sizes the scenes, expands the prompts as
the architecture does in each mode, batches what its encoder takes and draws the pictures; every mode trains
on those batches, and the auxiliary objective reads the encoder's grid features in the targets' grids."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flexvlm.architectures.llava_onevision import AnyresEncoder
from flexvlm.architectures.smolvlm import Connector, TiledEncoder
from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.collate import SequenceLimits
from flexvlm.data.datamodule import SyntheticVQADataModule
from flexvlm.losses import SyntheticAuxLoss
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import MODES, FlexVLM
from flexvlm.selection import AttentionSelection
from flexvlm.sweep import build_quietly, trained_cost

VIEWS = (2, 3)  # scenes of 2 x 3 views of 32 px: 64 x 96 px, 4 x 4 tokens a view


def smolvlm(mode):
    torch.manual_seed(0)
    encoder = TiledEncoder(PatchMLPBackbone(image_size=32, patch_size=4, embed_dim=16, hidden_dim=32), 2,
                           longest_edge=96)
    return FlexVLM(encoder=encoder, projector=Connector(64, 64), llm="tiny", mode=mode, num_sa_layers=1,
                   selection=AttentionSelection(ratio=0.125) if mode == "flex" else None)


def onevision(mode):
    torch.manual_seed(0)
    encoder = AnyresEncoder(PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=16, hidden_dim=32), 64,
                            pinpoints=[[32, 32], [64, 96], [96, 64]], max_views=9)
    return FlexVLM(encoder=encoder, projector="mlp2x_gelu", llm="tiny", mode=mode, num_sa_layers=1,
                   selection=AttentionSelection(ratio=0.125) if mode == "flex" else None)


# image tokens in the prompt: SmolVLM's 6 tiles and global view (16 tokens each), or the global view alone;
# OneVision's base view, the 8 x 12 grid and a newline a row, or the base view and one newline
IMAGE_TOKENS = {smolvlm: {"hd": 7 * 16, "other": 16}, onevision: {"hd": 16 + 8 * 13, "other": 17}}


def _batch(build, mode, size=2):
    model = build(mode)
    data = SyntheticVQADataModule(num_train=size, num_val=size, num_test=size, batch_size=size, image_size=None,
                                  patch_size=None, views=VIEWS)
    data.setup("fit")
    data.fit_to_model(SequenceLimits(64, 512, 512), model.encoder.image_processor(mode))
    return model, data, next(iter(data.train_dataloader()))


@pytest.mark.parametrize("build", [smolvlm, onevision])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_on_the_pipelines_batches(build, mode):
    model, data, batch = _batch(build, mode)
    expected = IMAGE_TOKENS[build]["hd" if mode == "hd" else "other"]
    assert ((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(-1) == expected).all()
    assert ((batch["prompt_ids"] == IMAGE_TOKEN_INDEX).sum(-1) == expected).all()
    out = model(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    out.loss.backward()
    assert out.loss.isfinite()
    if mode in ("xattn", "flex"):
        assert model.llm.layers[-1].self_attn.k_hr_proj.weight.grad is not None
    answer = model.generate(batch["prompt_ids"], batch["prompt_mask"], batch["images"], max_new_tokens=2)
    assert [len(tokens) for tokens in answer.tokens] == [2, 2]


def test_smolvlm_prompts_carry_its_special_tokens():
    _, data, batch = _batch(smolvlm, "hd")
    ids = batch["input_ids"][0].tolist()
    words = data.tokenizer.word_to_id
    assert ids.count(words["<fake_token_around_image>"]) == 6 + 2 and ids.count(words["<global-img>"]) == 1
    assert words["<row_2_col_3>"] in ids and words["<row_3_col_1>"] not in ids  # 2 x 3 tiles
    _, data, batch = _batch(smolvlm, "flex")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(words["<fake_token_around_image>"]) == 2 and words["<row_1_col_1>"] not in ids


@pytest.mark.parametrize("build", [smolvlm, onevision])
def test_grid_features_lie_on_the_targets_grids(build):
    """The auxiliary objective's inputs are row-major on the scene's low-res and high-res token grids: a tile's
    high-res feature differs from its surroundings', and the queried tile's target index is where the picture
    shows its colour."""
    model, data, batch = _batch(build, "flex")
    lr, hr = model.encoder.grid_features(batch["images"])
    assert lr.shape[:2] == batch["aux_lr_colour"].shape and hr.shape[:2] == batch["aux_hr_colour"].shape
    loss = SyntheticAuxLoss(model.encoder.feature_dim)(lr, hr, batch)
    assert loss.isfinite()
    picture, grid = data.processor.pictures(batch["images"])[0]
    assert picture.size == (96, 64) and grid == (8, 12)
    scene = data.splits["train"].scene(0)
    # the picture is the scene as the views cut it: pixel for pixel, but for the views' resampling
    assert np.abs(np.asarray(picture, dtype=float) - np.asarray(scene.image, dtype=float)).mean() < 8
    tile = scene.query
    assert batch["aux_hr_colour"][0, tile.row * 12 + tile.col] > 0


@pytest.mark.parametrize("architecture", ["smolvlm", "llava_onevision"])
def test_a_trained_runs_cost_is_measured_on_the_architectures_own_batches(architecture, tmp_path):
    """The sweep's and the protocol's FLOP count of a finished run fits the data to the model as a run does
    (the architecture's processor sizes the scenes and batches them), before it draws a test batch."""
    root = Path(__file__).resolve().parents[1]
    cli = build_quietly(["--config", str(root / "configs" / "synthetic.yaml"),
                         "--config", str(root / "experiments" / "synthetic" / "flex_attention_ratio.yaml"),
                         "--config", str(root / "experiments" / "synthetic" / "architectures" / f"{architecture}.yaml"),
                         "--data.init_args.num_test", "4", "--data.init_args.eval_batch_size", "4"])
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": cli.model.state_dict(), "global_step": 3}, checkpoint)
    cost = trained_cost(cli, checkpoint)
    assert cost["mode"] == "flex" and cost["train_steps"] == 3 and cost["mflops_per_sample"] > 0
