"""megatron-tropd: Trust Region On-Policy Distillation on megatron-core.

Runtime pins live in requirements.txt (what the tests and the CPU main job use); install_requires below
only states compatible ranges so the package can be installed into an existing NGC container.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-tropd",
    version="0.1.0",
    description="Trust Region On-Policy Distillation (TrOPD) and OPD baselines on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tropd", "megatron_tropd.*"]),
    # the import-only sgl_kernel stand-in that SGLang servers get on PYTHONPATH on machines without its kernels
    package_data={"megatron_tropd.rollout": ["cpu_stubs/sgl_kernel/*.py"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.18",
        "transformers>=4.51",
        "safetensors",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # GPU-only pieces: never needed to import the package or run the CPU tests.
        "gpu": ["transformer-engine[pytorch]"],
        "sglang": ["sglang==0.5.23"],
        "data": ["reasoning-gym==0.1.25", "pandas", "pyarrow"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["tropd=megatron_tropd.cli:main"]},
)
