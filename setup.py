"""Install the MAGE trainer: `pip install --no-build-isolation -e .`"""
from setuptools import find_packages, setup

setup(
    name="mage-trainer",
    version="0.1.0",
    description="Continual learning for multimodal LLMs (MAGE on SEED-X) with fused kernels",
    packages=find_packages(include=["mage", "mage.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.44",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"], "deepspeed": ["deepspeed"]},
)
