from setuptools import find_packages, setup

setup(
    name="sipo-plugin",
    version="0.1.0",
    description="Preference optimization (Diffusion-DPO, DPO-C&M, SIPO) for diffusion models, "
    "with a loss plugin registry and sd-scripts-compatible LoRA export",
    packages=find_packages(include=["sipo_plugin", "sipo_plugin.*"]),
    py_modules=["train_sipo"],
    include_package_data=True,
    package_data={"sipo_plugin.toy": ["model/*.json", "model/*/*", "vocab/*"],
                  "sipo_plugin.pairs.label": ["static/*"]},
    python_requires=">=3.10",
    # Ranges for your own environment; scripts/setup.sh installs the exact tested versions of
    # constraints.txt. torch is deliberately unpinned: CI and the quick start install the CPU wheel
    # (torch==2.13.0) first; GPU users install their own CUDA build before this package.
    # Lower bounds are the oldest versions the suite ran on: the text encoders' layout is
    # transformers 5's. transformers 5.24 + peft 0.21 is fine since every LoRA goes in through
    # peft's own inject_adapter_in_model (transformers' add_adapter there demands peft >= 0.22).
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.42",
        "transformers>=5.23,<6",
        "peft>=0.21",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
        "tomli; python_version<'3.11'",
    ],
    extras_require={
        "cuda": ["xformers", "bitsandbytes"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb>=0.17"],  # log_with = "wandb"
        "prodigy": ["prodigyopt>=1.0"],  # optimizer_type = "Prodigy"
        "video": ["av"],  # PyAV: decoding video pairs (cogvideox, wan)
        "pickapic": ["pyarrow>=14"],  # reading Pick-a-Pic v2 parquet shards
        # bitsandbytes runs on CPU too (8-bit states only for tensors of 4096+ elements)
        # selenium drives the system Chromium in the labelling page's browser test
        "test": ["pytest>=7", "av", "pyarrow>=14", "bitsandbytes", "tensorboard", "wandb>=0.17",
                 "prodigyopt>=1.0", "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["sipo-train=train_sipo:main",
                                     "sipo-pairs=sipo_plugin.pairs.cli:main"]},
)
