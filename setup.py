"""megolmo: a Megatron-style 3D-parallel trainer for OLMo 2.

torch is deliberately unpinned here so GPU users keep their own CUDA build; the CPU install
(``make venv``) pins the CPU wheel through ``requirements/cpu.txt``. Optional fused CUDA kernels
that are source installs are described in the README, never listed here.
"""
from setuptools import find_packages, setup

setup(
    name="megolmo",
    version="0.1.0",
    description="Megatron-style tensor/pipeline/data-parallel trainer for the OLMo 2 model family",
    packages=find_packages(include=["megolmo", "megolmo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "numpy",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "xxhash>=3",  # checkpoint checksums
        "matplotlib",
        "scipy",  # the ladder fit (L-BFGS-B)
    ],
    extras_require={
        "hf": ["transformers>=4.48"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.48", "mpich", "mpi4py", "torchao", "beaker-py>=2.8,<3",
                 "wandb>=0.19,<1", "tensorboard>=2.15,<3"],
        "wandb": ["wandb>=0.19,<1"],
        "tensorboard": ["tensorboard>=2.15,<3"],
        # olmo_eval's own dependencies, pinned where it pins them; the package itself goes in with --no-deps
        # (Makefile: EVAL_SPEC) because it also pins tokenizers<0.23, which transformers 5 cannot share.
        "eval": ["datasets>=3.6,<4", "pyarrow>=19,<20", "torchmetrics>=1", "importlib_resources", "requests",
                 "packaging"],
        "beaker": ["beaker-py>=2.8,<3"],
        "mpi": ["mpi4py"],
        "gpu": ["transformer-engine[pytorch]", "torchao"],
        "bench": ["ai2-olmo-core", "transformers>=4.48"],
    },
)
