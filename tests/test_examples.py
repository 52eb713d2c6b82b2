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


def test_lottery_ticket_digits():
    out = run("lottery_ticket_digits.py", "--rounds", "2", "--epochs", "1", "--rate", "0.5")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    remaining = [float(r[1].rstrip("%")) / 100 for r in rows]
    # each round prunes half of what remains (the classifier a quarter): remaining shrinks geometrically
    assert remaining[0] == 1.0 and 0.25 < remaining[2] < remaining[1] < 0.6
    assert len(rows[-1]) == 4  # the last round has its random re-initialisation control
    assert f"ticket: {rows[-1][1]} of the weights remain" in out


def test_quantize_lightning(tmp_path):
    out = run("quantize_lightning.py", "--epochs", "2", "--max-trials", "2", "--tolerance", "0.05",
              "--output", str(tmp_path / "model.int8"))
    assert "reloaded, same predictions: True" in out
    assert (tmp_path / "model.int8").exists()
    assert "chosen: " in out and "fp32 (no candidate met the goal)" not in out
