"""The scripts in examples/ run as documented (short settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from litcompress.report.compression import CompressionReport

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compress_plain_pytorch(tmp_path):
    out = run("compress_plain_pytorch.py", "--epochs", "2", "--fine-tune-epochs", "1", "--output-dir", str(tmp_path))
    report = CompressionReport.load_json(tmp_path / "report.json")
    assert [s.stage for s in report.stages] == ["input", "pruned", "shrunk", "quantized"]
    assert report.table() in out
    assert report["shrunk"].parameters == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10  # half of each hidden


def test_prune_digits():
    out = run("prune_digits.py", "--epochs", "2", "--target", "0.5")
    assert "at 50.00% weight sparsity (target 50%)" in out
