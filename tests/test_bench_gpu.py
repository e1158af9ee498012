"""bench/gpu.py, the GPU benchmark, checked on the CPU at a small shape (its figures mean nothing there): every
section runs and reports, so that a GPU session spends its minutes measuring, not mending the script. Slow."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NANOGPT = ROOT.parent / "shared" / "reference" / "nanoGPT"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_section_on_a_cpu(tmp_path):
    args = ["--device", "cpu", "--small", "--no_compile", "--steps", "4", "--warmup", "1", "--new_tokens", "16",
            "--decode_batch", "4", "--rounds", "1", "--clients", "4", "--serve_seconds", "2",
            "--json", str(tmp_path / "gpu.json")]
    if NANOGPT.is_dir():
        shutil.copytree(NANOGPT, tmp_path / "nanoGPT")
        args += ["--nanogpt", str(tmp_path / "nanoGPT")]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["train_llmlab"]["tokens_per_s"] > 0 and 0 < result["train_llmlab"]["mfu"] < 1
    assert (result["train_nanogpt"] is not None) == NANOGPT.is_dir()
    assert {f"batch{b}_{n}" for b in (1, 4) for n in ("llmlab", "llmlab_compiled", "transformers")} <= set(result["decode"])
    assert result["serve"]["concurrent_errors"] == 0 and result["serve"]["concurrent_tokens_per_s"] > 0
