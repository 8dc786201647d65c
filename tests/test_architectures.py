"""The architecture registry: a folder's architecture read from its config.json (never its name), an
unknown one refused with the list of known ones; and the layering it rests on: the model layer
imports nothing from the architectures, the loaders above it or the training code."""

import json
import subprocess
import sys

import pytest

from flexvlm.architectures import ARCHITECTURES, architecture_of

transformers = pytest.importorskip("transformers")


def test_a_folder_of_an_architecture_flexvlm_does_not_build_is_refused_listing_those_it_builds(tmp_path):
    transformers.Blip2Config().save_pretrained(tmp_path / "llava-1.5-7b")  # a misleading name: the config decides
    with pytest.raises(ValueError, match=r"model_type 'blip-2'.* is no architecture flexvlm builds; it builds "
                                         + ", ".join(a.name for a in ARCHITECTURES)):
        architecture_of(tmp_path / "llava-1.5-7b")


@pytest.mark.parametrize("config", [
    {"model_type": "llava"},  # llava-hf
    {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"},  # the original layout, the release
    {"model_type": "llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"},  # an older original one
])
def test_llava_folders_are_told_by_their_config(config, tmp_path):
    (tmp_path / "some-name").mkdir()
    (tmp_path / "some-name" / "config.json").write_text(json.dumps(config))
    assert architecture_of(tmp_path / "some-name").name == "llava-1.5"


def test_the_model_layer_imports_no_loader_training_or_command_line_code():
    """Importing the model (and its decoding) loads flexvlm's model layer and its leaves alone."""
    code = ("import sys, flexvlm.models.vlm, flexvlm.models.generation, flexvlm.selection, flexvlm.reduction; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('flexvlm'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    leaves = {"flexvlm", "flexvlm.constants", "flexvlm.registry", "flexvlm.sharding", "flexvlm.weights"}
    model_layer = ("flexvlm.models", "flexvlm.attention", "flexvlm.selection", "flexvlm.reduction")
    above = [m for m in loaded if m not in leaves and not m.startswith(model_layer)]
    assert above == []
