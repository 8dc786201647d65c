"""The benchmark script builds each of its variants (a model setting it would refuse otherwise shows
here, not only when someone reruns the benchmark)."""

import argparse
import importlib.util
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_efficiency.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_module()


@pytest.mark.parametrize("variant", sorted(BENCH.VARIANTS))
def test_every_benchmark_variant_builds_in_its_mode(variant):
    args = argparse.Namespace(hidden=64, layers=4, patch=8, device="cpu", dtype="float32", attn_backend="eager")
    model = BENCH.build(variant, args)
    mode, selection, _ = BENCH.VARIANTS[variant]
    assert model.mode == mode and (model.selection is None) == (selection is None)
    assert model.attn_backend.name == "eager"


def test_the_gpu_check_runs_the_cuda_tests_and_the_benchmark_for_each_backend():
    """scripts/gpu_check.sh is a valid bash script that names what issue 22 asks it to run."""
    script = SCRIPT.parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-m cuda" in text and "--device cuda --dtype bfloat16" in text and "--hidden 4096" in text
    assert "for backend in sdpa flex" in text
