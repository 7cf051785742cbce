"""The Colab notebooks in colab/ run top to bottom on CPU with tiny models.

``VQGAN_JAX_NOTEBOOK_TEST=1`` makes the notebooks skip what needs the network, an upload or a
downloaded checkpoint (installing, downloading, uploading, TensorBoard) and stand in a tiny
model and a bundled photo; everything else runs as in Colab. Code cells are joined and run in
a fresh Python process (one device, like a Colab runtime).
"""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT

OUTPUTS = {"reconstruct": ["reconstruction.png"], "sample": ["samples.png", "large.png"],
           "train_demo": ["reconstructions.png", "runs/demo/checkpoints/2"]}


def notebook_code(name: str) -> str:
    book = json.loads((ROOT / "colab" / f"{name}.ipynb").read_text())
    return "\n\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code")


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in (ROOT / "colab").glob("*.ipynb")) == sorted(OUTPUTS)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_notebook_runs(name, tmp_path):
    if name == "reconstruct":
        pytest.importorskip("torch")  # it converts a taming checkpoint
    env = dict(os.environ, VQGAN_JAX_NOTEBOOK_TEST="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", notebook_code(name)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    for output in OUTPUTS[name]:
        assert (tmp_path / output).exists(), output
    if name == "sample":
        large, grid = Image.open(tmp_path / "large.png"), Image.open(tmp_path / "samples.png")
        assert large.size == (32, 16)  # an 8x16 code grid (f2), twice the training width
        assert grid.size[1] > 3 * 16  # a row per class
