from setuptools import find_packages, setup

setup(
    name="moeframe",
    version="0.1.0",
    description="MoE-focused distributed training for decoder-only language models",
    packages=find_packages(include=["moe", "moe.*", "parallel", "parallel.*", "train", "train.*", "launchers", "launchers.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "pyyaml", "tensorboard"],
    extras_require={
        # torchao pinned where the float8 tests were checked (it calls torchao's float8 internals)
        "test": ["pytest", "transformers", "safetensors", "tokenizers", "torchao==0.18.0"],
        "hf": ["transformers", "safetensors", "tokenizers"],
        # megablocks is a CUDA source build pinned to old torch; NVIDIA apex is not on PyPI
        # (build it from NVIDIA's repository). Both are detected at run time, never required.
        "megablocks": ["megablocks"],
        # float8 training (training.fp8); torchao brings no torch of its own. Detected at run time.
        "fp8": ["torchao>=0.18"],
    },
)
