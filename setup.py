"""Install the MAGE trainer: `pip install --no-build-isolation -e ".[test]"`

Also builds the native op mage::pema_update_ (csrc/) as the module `mage._C`:
- the CPU implementation always (needs torch importable at build time, hence --no-build-isolation);
- the CUDA implementation too when torch is a CUDA build and nvcc is found.
Environment switches: MAGE_SKIP_EXT=1 builds no native code (mage.ops then falls back to the eager
loop with a warning); MAGE_SKIP_CUDA_BUILD=1 builds the CPU op only; TORCH_CUDA_ARCH_LIST defaults
to "9.0a" (Hopper); MAX_JOBS (parallel compile jobs) defaults to 2.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _log(msg: str) -> None:
    print(f"[mage setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit holding the nvcc on PATH.

    nvcc may be a wrapper script outside the toolkit (here /usr/local/bin/nvcc execs
    /usr/local/cuda-13.0/bin/nvcc), so accept a candidate only if it has the runtime headers.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _nvcc_major(cuda_home: str) -> str | None:
    """The major version of the toolkit's nvcc ("13" from "release 13.0"), None if it does not run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return match.group(1) if match else None


def _pip_cuda_include(cuda_home: str, cuda_major: str) -> list[str]:
    """The headers of torch's pip CUDA wheels (nvidia/cu<major>/include), when the local toolkit
    lacks the cuBLAS headers that ATen's CUDA headers include."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(base, f"cu{cuda_major}", "include")
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            return [inc]
    return []


def native_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for mage._C, or nothing when skipped or torch is missing."""
    if os.environ.get("MAGE_SKIP_EXT") == "1":
        _log("MAGE_SKIP_EXT=1: building no native op")
        return [], {}
    want_cuda = os.environ.get("MAGE_SKIP_CUDA_BUILD") != "1"
    cuda_home = _find_cuda_home() if want_cuda else None
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time (use --no-build-isolation): building no native op")
        return [], {}
    os.environ.setdefault("MAX_JOBS", "2")

    sources = ["csrc/pema.cpp", "csrc/python_module.cpp"]
    # Contraction off: each product and sum rounds once, as in the eager float32 reference.
    cxx_flags = ["-O3", "-ffp-contract=off"]
    torch_cuda_major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    nvcc_major = _nvcc_major(cuda_home) if cuda_home and torch_cuda_major else None
    # torch refuses to compile with an nvcc of another major version than its own CUDA.
    build_cuda = want_cuda and torch_cuda_major is not None and nvcc_major == torch_cuda_major
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        _log(f"building CPU + CUDA op (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = cpp_extension.CUDAExtension(
            name="mage._C",
            sources=sources + ["csrc/cuda/pema.cu"],
            include_dirs=_pip_cuda_include(cuda_home, torch_cuda_major),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
        )
    else:
        why = ("MAGE_SKIP_CUDA_BUILD=1" if not want_cuda else
               "torch is a CPU build" if torch_cuda_major is None else
               "nvcc not found" if nvcc_major is None else
               f"nvcc is CUDA {nvcc_major} but torch is built for CUDA {torch_cuda_major}")
        _log(f"building the CPU op only ({why})")
        ext = cpp_extension.CppExtension(name="mage._C", sources=sources,
                                         extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()

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
    # decoder: SEED-X's SDXL image decoder (diffusers); sentencepiece: the slow LLaMA tokenizer of SEED-X.
    extras_require={"test": ["pytest", "diffusers", "sentencepiece"], "decoder": ["diffusers"],
                    "sentencepiece": ["sentencepiece"], "deepspeed": ["deepspeed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
