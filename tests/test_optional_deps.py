"""diffusers is optional: the package imports and trains without it; decoding says how to install it."""
import subprocess
import sys

CODE = """
import sys
sys.modules["diffusers"] = None  # as if not installed
import mage.trainer.loop, mage.trainer.evaluate, mage.model.detokenizer
import torch
from mage.model.detokenizer import load_decoder
try:
    load_decoder(".", torch.zeros(1, 1))
except ImportError as e:
    print("IMPORT-ERROR:", e)
"""


def test_package_works_without_diffusers():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR: decoding images needs diffusers: pip install -e '.[decoder]'" in out.stdout
