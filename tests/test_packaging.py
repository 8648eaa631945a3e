"""Packaging: our top-level `kernels` package must not be mistaken for the PyPI `kernels` (HF hub kernels)
that transformers probes, and the generic layers must not import `mage`."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    code = (
        "import kernels, pathlib; "
        f"assert pathlib.Path(kernels.__file__).resolve().parent == pathlib.Path({str(ROOT / 'kernels')!r}); "
        "from transformers.utils import is_kernels_available; "
        "assert not is_kernels_available(), 'transformers thinks hub kernels are installed'; "
        "from transformers import LlamaConfig, LlamaForCausalLM; import torch; "
        "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)); "
        "print(m(torch.randint(0, 32, (1, 4))).logits.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 4, 32])" in out.stdout


def test_generic_layers_never_import_mage():
    for folder in ("kernels",):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n == "mage" or n.startswith("mage.") for n in names), f"{path} imports {names}"
