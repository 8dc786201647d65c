"""The benchmark script builds each of its variants (a model setting it would refuse otherwise shows
here, not only when someone reruns the benchmark)."""

import argparse
import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

from flexvlm.models.geometry import square_layout
from flexvlm.selection.base import SelectionContext

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_efficiency.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_module()


@pytest.mark.parametrize("variant", sorted(BENCH.VARIANTS))
def test_every_benchmark_variant_builds_in_its_mode(variant):
    args = argparse.Namespace(hidden=64, layers=4, patch=8, device="cpu", dtype="float32", attn_backend="eager",
                              concentrated_union=BENCH.TRAINED_UNION)
    model = BENCH.build(variant, args)
    mode, selection, _ = BENCH.VARIANTS[variant]
    assert model.mode == mode and (model.selection is None) == (selection is None)
    assert model.attn_backend.name == "eager"


def test_concentrated_rows_pick_their_best_blocks_among_those_the_rows_rank_highest_on_average():
    """Two rows on a 4 x 4 grid, a block a cell: the pool is the 3 cells of the highest mean map
    (15, 14, 0), and each row keeps its best 2 of those, not its best 2 overall (15, 5 and 14, 6)."""
    maps = torch.zeros(1, 2, 16)
    maps[0, 0, [15, 0, 5]] = torch.tensor([9.0, 5.0, 7.0])
    maps[0, 1, [14, 0, 6]] = torch.tensor([9.0, 3.0, 6.0])  # means: 15, 14 4.5; 0 4; 5 3.5; 6 3
    layout = square_layout(torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(1, 12, 12, dtype=torch.bool))
    strategy = BENCH.ConcentratedSelection(union=3 / 16, ratio=2 / 16, block_grid=4)
    mask = strategy(maps.view(1, 2, 4, 4), SelectionContext(layout, layer=1))  # (1, 2, 12, 12), zoom 3
    blocks = mask.view(2, 4, 3, 4, 3)[:, :, 0, :, 0].flatten(1)
    assert blocks[0].nonzero().flatten().tolist() == [0, 15] and blocks[1].nonzero().flatten().tolist() == [0, 14]


def test_the_gpu_check_runs_the_cuda_tests_and_the_benchmark_for_each_backend():
    """scripts/gpu_check.sh is a valid bash script that names what issue 22 asks it to run."""
    script = SCRIPT.parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-m cuda" in text and "--device cuda --dtype bfloat16" in text and "--hidden 4096" in text
    assert "for backend in sdpa flex" in text
