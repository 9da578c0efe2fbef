from setuptools import find_packages, setup

setup(
    name="distill",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 distillation of LLaVA-style vision-language models "
    "with visual-attention alignment on fused attention kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["distill", "distill.*", "data_prep", "data_prep.*"]),
    install_requires=[
        # Any torch >= 2.4 works; never pin a range that excludes an installed CPU/CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.17,<6",  # lowest tested: `make test-lowest` runs 5.17.0
        "tokenizers>=0.20",
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "webdataset>=0.2.90",
        "pillow",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "lora": ["peft>=0.10"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest>=7", "peft>=0.10", "tensorboard", 'triton; platform_system == "Linux" and platform_machine == "x86_64"'],
    },
)
