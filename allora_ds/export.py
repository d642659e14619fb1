"""allora-export: a training checkpoint -> a merged Hugging Face model and/or a PEFT LoRA adapter.

    allora-export --checkpoint runs/x/checkpoints/step-00000100 --output out/merged --merged
    allora-export --checkpoint runs/x/checkpoints/step-00000100 --output out/adapter --adapter

Merged: every base shard is read, the targeted weights get ``W + s*B@A`` (s = 1 for ALLoRA,
alpha/r for LoRA) in fp32, and the shard is written straight back out: peak memory is one
shard plus the adapters, whatever the model size. Adapter: ``adapter_model.safetensors`` +
``adapter_config.json`` with ``lora_alpha`` chosen so PEFT's scale ``lora_alpha/r`` equals ours.
Outputs are written to a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from allora_ds import log
from allora_ds.adapters import merged_weight
from allora_ds.checkpoint import DS_DIR, DS_TAG, is_complete, read_adapter_state, read_trainer_state
from allora_ds.config import TORCH_DTYPES, DataConfig, is_local_path
from allora_ds.errors import UserError, cli

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")
SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"


def check_checkpoint(ckpt: Path) -> dict:
    if not ckpt.is_dir():
        raise UserError(f"--checkpoint: {ckpt} does not exist")
    if not is_complete(ckpt):
        raise UserError(f"--checkpoint: {ckpt} is incomplete (interrupted while saving?); use an earlier step")
    return read_trainer_state(ckpt)


def adapter_pairs(ckpt: Path, from_deepspeed: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module_name: (A, B)}`` in fp32, from the checkpoint's snapshot or its DeepSpeed partitions."""
    if from_deepspeed:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / DS_DIR), tag=DS_TAG,
                                                              exclude_frozen_parameters=True)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--checkpoint: cannot consolidate the DeepSpeed partitions in {ckpt / DS_DIR}: {e}") from None
        state = {k: v for k, v in state.items() if k.endswith((SUFFIX_A, SUFFIX_B))}
    else:
        state = read_adapter_state(ckpt)
    pairs = {}
    for key in state:
        if key.endswith(SUFFIX_A):
            name = key[: -len(SUFFIX_A)]
            if name + SUFFIX_B not in state:
                raise UserError(f"{ckpt}: {key} has no matching {name + SUFFIX_B}")
            pairs[name] = (state[key].float(), state[name + SUFFIX_B].float())
    if not pairs:
        raise UserError(f"{ckpt}: no adapter weights found")
    return pairs


def resolve_base(base: str) -> Path:
    """A local directory for the base model (downloading a hub id's safetensors when online)."""
    p = Path(base).expanduser()
    if p.is_dir():
        return p
    if is_local_path(base):
        raise UserError(f"--base: {base} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix (offline, no access)
        raise UserError(f"--base: {base} is not a local directory and could not be fetched: {e}") from None


def base_shards(base: Path) -> tuple[list[str], dict | None]:
    """Shard file names of a safetensors base model, and its index (None for a single file)."""
    index_file = base / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise UserError(f"--base: {base} has no model.safetensors or model.safetensors.index.json")


def _atomic_output(output: Path, overwrite: bool):
    """A temp dir next to ``output``; ``commit(tmp)`` moves it into place."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"--output: {output} exists and is not empty (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))

    def commit():
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)

    return tmp, commit


def export_merged(ckpt: Path, output: Path, base: str | None = None, dtype: str | None = None,
                  overwrite: bool = False, from_deepspeed: bool = False) -> Path:
    state = check_checkpoint(ckpt)
    base_dir = resolve_base(base or state["config"]["model"]["path"])
    scale = float(state["adapter"]["scale"])
    pairs = adapter_pairs(ckpt, from_deepspeed)
    shards, index = base_shards(base_dir)
    want = {f"{name}.weight": name for name in pairs}
    tmp, commit = _atomic_output(output, overwrite)
    try:
        merged = set()
        for shard in shards:
            tensors = {}
            with safe_open(str(base_dir / shard), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    target = TORCH_DTYPES[dtype] if dtype and tensor.is_floating_point() else tensor.dtype
                    if key in want:
                        A, B = pairs[want[key]]
                        if tensor.shape != (B.shape[0], A.shape[1]):
                            raise UserError(f"adapter {want[key]} is {B.shape[0]}x{A.shape[1]} but base weight {key} "
                                            f"is {tuple(tensor.shape)}: the checkpoint was trained on another base")
                        tensor = merged_weight(tensor, A, B, scale, target)  # rounded once, to the output dtype
                        merged.add(key)
                    tensors[key] = tensor.to(target).contiguous()
            save_file(tensors, str(tmp / shard), metadata={**meta, "format": "pt"})
            del tensors
        missing = sorted(set(want) - merged)
        if missing:
            raise UserError(f"--base: {base_dir} has no weight {missing[0]} (and {len(missing) - 1} more): "
                            "another architecture than the checkpoint's")
        if index is not None:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((base_dir / "config.json").read_text())
        if dtype:
            config["dtype"] = dtype
            config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
        tok_dir = tokenizer_dir(state["config"], base_dir)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        add_stop_tokens(tmp, state["config"], config)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def tokenizer_dir(run_config: dict, base_dir: Path) -> Path:
    """The tokenizer the run trained with (``model.tokenizer`` when it is a local directory), else the base's."""
    tok = run_config["model"].get("tokenizer")
    return Path(tok).expanduser() if tok and Path(tok).expanduser().is_dir() else base_dir


def add_stop_tokens(out: Path, run_config: dict, model_config: dict) -> None:
    """Make the exported model's generation stop on what the finetune taught it to end a response with.

    A base model's generation config stops on EOS only (Llama-3.1: ``<|end_of_text|>``); finetuned
    on chat data it ends each reply with ``<|eot_id|>`` instead, and would otherwise never stop. A
    mixture teaches the ends of all its sources' formats.
    """
    if not any((out / name).is_file() for name in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    from allora_ds.modeling import stop_token_ids

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=bool(run_config["model"].get("trust_remote_code")))
    from allora_ds.pretokenized import source_formats

    data = DataConfig.from_dict(run_config["data"])
    formats = data.train_formats()
    if data.tokenized and data.train is None:  # the config names the directory, its manifest the sources
        formats = source_formats(data.tokenized) or formats
    stops = list(dict.fromkeys(t for fmt in formats for t in stop_token_ids(tok, fmt)))
    path = out / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {
        k: model_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if model_config.get(k) is not None}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    missing = [t for t in stops if t not in eos]
    if missing:
        eos += missing
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        path.write_text(json.dumps(gen, indent=2) + "\n")


def export_adapter(ckpt: Path, output: Path, base: str | None = None, overwrite: bool = False,
                   from_deepspeed: bool = False) -> Path:
    state = check_checkpoint(ckpt)
    pairs = adapter_pairs(ckpt, from_deepspeed)
    ad = state["adapter"]
    rank = int(ad["rank"])
    tensors = {}
    for name, (A, B) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        # PEFT multiplies B@A by lora_alpha / r; ALLoRA's scale is 1, LoRA's alpha / r.
        "lora_alpha": float(ad["scale"]) * rank, "lora_dropout": 0.0,
        "target_modules": sorted(ad["target_modules"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": base or state["config"]["model"]["path"],
        "revision": state["config"]["model"].get("revision"),
    }
    tmp, commit = _atomic_output(output, overwrite)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def export_run(cfg, ckpt: Path) -> dict[str, Path]:
    """The end-of-training export asked for by ``cfg.export`` into ``output_dir/export/``."""
    root = Path(cfg.train.output_dir) / "export"
    done = {}
    if cfg.export.merged:
        done["merged"] = export_merged(ckpt, root / "merged", dtype=cfg.export.dtype, overwrite=True)
    if cfg.export.adapter:
        done["adapter"] = export_adapter(ckpt, root / "adapter", overwrite=True)
    for kind, path in done.items():
        log.info(f"exported {kind}: {path}", every_rank=True)
    return done


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="allora-export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint dir: RUN/checkpoints/step-N")
    p.add_argument("--output", required=True, type=Path, help="output directory (with both kinds: OUTPUT/merged, OUTPUT/adapter)")
    p.add_argument("--merged", action="store_true", help="write the merged Hugging Face model")
    p.add_argument("--adapter", action="store_true", help="write the PEFT LoRA adapter")
    p.add_argument("--base", help="base model dir or hub id (default: the model.path the run trained on)")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="dtype of the merged weights (default: the base's)")
    p.add_argument("--from-deepspeed", action="store_true",
                   help="consolidate the adapters from DeepSpeed's fp32 optimizer partitions instead of the snapshot")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    a = p.parse_args(argv)
    if not (a.merged or a.adapter):
        raise UserError("nothing to do: pass --merged and/or --adapter")
    both = a.merged and a.adapter
    if a.merged:
        out = export_merged(a.checkpoint, a.output / "merged" if both else a.output, a.base, a.dtype, a.overwrite,
                            a.from_deepspeed)
        print(f"merged model: {out}")
    if a.adapter:
        out = export_adapter(a.checkpoint, a.output / "adapter" if both else a.output, a.base, a.overwrite,
                             a.from_deepspeed)
        print(f"PEFT adapter: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
