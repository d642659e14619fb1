from setuptools import find_packages, setup

setup(
    name="allora-ds",
    version="0.1.0",
    description="ALLoRA finetuning of Llama-3-class models on DeepSpeed ZeRO-3, with Hugging Face export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository's ds_configs/ ships inside the package as allora_ds/ds_configs (one copy of the
    # files), so `train.deepspeed=zero3_bf16` works wherever allora-train is installed.
    packages=find_packages(include=["allora_ds", "allora_ds.*"]) + ["allora_ds.ds_configs"],
    package_dir={"allora_ds.ds_configs": "ds_configs"},
    package_data={"allora_ds": ["assets/*"], "allora_ds.ds_configs": ["*.json", "README.md"]},
    # Floors are the oldest releases the code is shown to work with: `make test-floors` (run by CI)
    # installs exactly these (.ci/floors.py) and runs the unit tests and a 2-rank ZeRO-3 run.
    # torch: CI can only get 2.13.0 (CPU); 2.11 is the one on the project's GPU test machine, not CI.
    # Below them: deepspeed 0.15 needs numactl to start CPU ranks and 0.14 does not import with
    # torch 2.13; transformers 4.57 ignores rope_parameters and encodes chat turns of the demo's
    # tokenizer differently; datasets 4.6 fails the data tests (an empty file is not reported as
    # such). safetensors 0.4.3 is what transformers 5.0 needs.
    install_requires=[
        "torch>=2.11",
        "deepspeed>=0.16",
        "transformers>=5.0",
        # 1.2.1: transformers 5.0 imports what 1.1 lacks
        "accelerate>=1.2.1",  # transformers' device_map (ZeRO-2 ranks load the base straight to their GPU)
        "datasets>=4.7",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4.3",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # llama-models ships Meta's Llama-3 tokenizer (tiktoken format) for tests/llama3.py; ruff is
        # pinned so that `make lint` gives the same answer everywhere; wandb and mlflow are the real
        # trackers tests/integration/test_trackers.py reports to (about 45 s more to install).
        "dev": ["pytest>=8", "peft>=0.13", "accelerate>=1.0", "matplotlib", "psutil", "tiktoken", "llama-models",
                "ruff==0.17.6", "wandb", "mlflow"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],  # train.report_to: [wandb]
        "mlflow": ["mlflow"],  # train.report_to: [mlflow]; the full package: the tests run its `mlflow server`
        "eval": ["peft>=0.13"],  # allora-eval on a PEFT adapter directory
    },
    entry_points={
        "console_scripts": [
            "allora-train=allora_ds.train:main",
            "allora-export=allora_ds.export:main",
            "allora-eval=allora_ds.commonsense_eval:main",
            "allora-plan=allora_ds.plan:main",
            "allora-data=allora_ds.data_cli:main",
        ]
    },
)
