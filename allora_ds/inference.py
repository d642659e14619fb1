"""Load a finetuned model for inference and generate from token ids in batches.

Three inputs give the same weights (tested):

* a merged Hugging Face model directory (``allora-export --merged``): loaded by transformers;
* a PEFT LoRA adapter directory (``allora-export --adapter`` or any PEFT LoRA) on its base:
  loaded by PEFT and merged with ``merge_and_unload`` (needs ``pip install 'allora-ds[eval]'``);
* a training checkpoint ``RUN/checkpoints/step-N`` (or the run directory: its newest complete
  checkpoint) on its base: the checkpoint's fp32 adapters merged with ``merged_weight``, as
  ``allora-export`` does, without writing a merged copy first.

Generation is transformers' ``generate`` with a KV cache on left-padded batches; the vLLM path is
optional and only used when asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from allora_ds.config import TORCH_DTYPES
from allora_ds.errors import UserError

EOT = "<|eot_id|>"  # Llama-3's end of turn: a model finetuned on chat data stops with it (PITFALLS 7)


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` points at: ``kind`` is merged, peft or checkpoint; ``base`` for the last two."""

    kind: str
    path: Path
    base: str | None = None
    tokenizer: str | None = None  # a PEFT adapter directory that carries its own tokenizer

    def describe(self) -> str:
        return str(self.path) if self.kind == "merged" else f"{self.path} ({self.kind}) on {self.base}"


def resolve_source(model: str, base: str | None = None) -> ModelSource:
    """Work out the kind of ``--model`` and, for adapters and checkpoints, the base model."""
    from allora_ds.checkpoint import STATE_FILE, complete_checkpoints, is_complete, read_trainer_state

    p = Path(model).expanduser()
    if not p.is_dir():
        raise UserError(f"--model: {model} is not a directory (expected a merged model, a PEFT adapter, "
                        "a training checkpoint or a run directory)")
    if (p / "adapter_config.json").is_file():
        try:
            cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--model: {p / 'adapter_config.json'}: unreadable ({e})") from None
        if cfg.get("peft_type") != "LORA":
            raise UserError(f"--model: {p} is a PEFT {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
        base = base or cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"--model: {p} is a PEFT adapter without base_model_name_or_path: pass --base")
        own_tokenizer = str(p) if (p / "tokenizer_config.json").is_file() else None
        return ModelSource("peft", p, base, own_tokenizer)
    if not (p / STATE_FILE).is_file() and complete_checkpoints(p):  # a run directory
        p = complete_checkpoints(p)[-1]
    if (p / STATE_FILE).is_file():
        if not is_complete(p):
            raise UserError(f"--model: checkpoint {p} is incomplete (interrupted while saving?); use an earlier step")
        return ModelSource("checkpoint", p, base or read_trainer_state(p)["config"]["model"]["path"])
    if (p / "config.json").is_file():
        if base:
            raise UserError(f"--base: {model} is a merged model, which needs no base (drop --base)")
        return ModelSource("merged", p)
    raise UserError(f"--model: {p} has no config.json, adapter_config.json or {STATE_FILE}: not a merged model, "
                    "a PEFT adapter or a training checkpoint")


def _base_dir(source: ModelSource) -> str:
    """The base as a local directory (a hub id is fetched when online, as allora-export does)."""
    from allora_ds.export import resolve_base

    return str(resolve_base(source.base))


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer the model was trained with; left padding for generation.

    Merged model: the one exported with it. Checkpoint: the run's ``model.tokenizer`` or the base's
    (as allora-export picks). PEFT adapter: its own when it has one, else the base's.
    """
    from transformers import AutoTokenizer

    from allora_ds.checkpoint import read_trainer_state
    from allora_ds.export import tokenizer_dir
    from allora_ds.modeling import LLAMA3_PAD

    if source.kind == "merged":
        where = source.path
    elif source.kind == "checkpoint":
        where = tokenizer_dir(read_trainer_state(source.path)["config"], Path(_base_dir(source)))
    else:
        where = source.tokenizer or _base_dir(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {where}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = LLAMA3_PAD if LLAMA3_PAD in tok.get_vocab() else tok.eos_token
    tok.padding_side = "left"  # prompts end where generation starts
    return tok


def _from_pretrained(path: str, what: str, dtype: torch.dtype, device_map, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
            raise UserError(f"{what}: {path} is a {config.architectures or config.model_type}, not a causal LM")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot load a model from {path}: {str(e).splitlines()[0]}") from None


def merge_checkpoint_adapters(model: torch.nn.Module, ckpt: Path, base: str) -> int:
    """Add a checkpoint's ``scale * B A`` to the matching weights of ``model``; returns the count."""
    from allora_ds.checkpoint import read_trainer_state
    from allora_ds.export import adapter_pairs

    return merge_adapters(model, adapter_pairs(ckpt), float(read_trainer_state(ckpt)["adapter"]["scale"]),
                          f"checkpoint {ckpt}", base)


def merge_adapters(model: torch.nn.Module, pairs: dict, scale: float, what: str, base: str) -> int:
    """Add ``scale * B A`` of each ``{module_name: (A, B)}`` to ``model``'s weights, in place.

    Every target is checked before any is changed. A weight that accelerate offloaded (a device
    map with cpu or disk entries) lives on ``meta`` in the module and in accelerate's weight map
    elsewhere: a copy into it does nothing, so the model would be evaluated without those layers'
    adapters. That is refused (PEFT adapters are fine: PEFT's merge loads offloaded layers).
    """
    from allora_ds.adapters import merged_weight

    modules = dict(model.named_modules())
    for name, (A, B) in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear):
            raise UserError(f"--model: {what} adapts {name}, which the base {base} does not have: "
                            "it was trained on another architecture")
        if tuple(layer.weight.shape) != (B.shape[0], A.shape[1]):
            raise UserError(f"--model: adapter {name} is {B.shape[0]}x{A.shape[1]} but the base {base} has "
                            f"{tuple(layer.weight.shape)}: the checkpoint was trained on another base")
        if layer.weight.device.type == "meta":
            raise UserError(f"--device-map: {name} is offloaded (cpu/disk) by the device map, and the adapters of a "
                            f"training checkpoint cannot be merged into offloaded weights; export it first "
                            f"(allora-export --merged) and evaluate the merged model, or give the model enough GPUs")
    with torch.no_grad():
        for name, (A, B) in pairs.items():
            w = modules[name].weight
            w.copy_(merged_weight(w, A.to(w.device), B.to(w.device), scale))
    return len(pairs)


def _peft_error(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "size mismatch" in ln or "not found" in ln), lines[0] if lines else type(e).__name__)


def load_model(source: ModelSource, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
               trust_remote_code: bool = False):
    """The model of ``source`` with any adapter merged into its weights, in eval mode on ``device``."""
    placement = device_map or {"": device}
    if source.kind == "merged":
        model = _from_pretrained(str(source.path), "--model", TORCH_DTYPES[dtype], placement, trust_remote_code)
    else:
        base = _base_dir(source)
        model = _from_pretrained(base, "--base", TORCH_DTYPES[dtype], placement, trust_remote_code)
        if source.kind == "checkpoint":
            merge_checkpoint_adapters(model, source.path, source.base)
        else:
            try:
                from peft import PeftModel
            except ImportError:
                raise UserError(f"--model: {source.path} is a PEFT adapter; loading it needs peft "
                                "(pip install 'allora-ds[eval]'), or export a merged model instead") from None
            try:
                model = PeftModel.from_pretrained(model, str(source.path)).merge_and_unload()
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"--model: the adapter {source.path} does not fit the base {source.base}: "
                                f"{_peft_error(e)}") from None
    model.eval()
    return model


def generation_stop_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids to stop on: the model's, the tokenizer's and Llama-3's end of turn."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    ids.add(tokenizer.eos_token_id)
    if EOT in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(EOT))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, num_beams: int, max_new_tokens: int,
             on_batch=None) -> list[str]:
    """Decoded continuations of ``prompts`` (token ids), generated ``batch_size`` at a time.

    Batches are taken in the given order (the caller sorts by length so a batch pads little), left
    padded, and decoded without special tokens. Sampling is off: greedy for ``num_beams=1``, beam
    search otherwise. ``on_batch(n)`` is called after each batch (progress).
    """
    from transformers import GenerationConfig

    # Replace, not merge: a base's generation_config.json may ask for sampling (Llama-3-8B does).
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=num_beams, num_return_sequences=1, max_new_tokens=max_new_tokens,
        length_penalty=1.0, early_stopping=False, eos_token_id=generation_stop_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True,
    )
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, padding_side="left", return_tensors="pt")
        ids = batch["input_ids"].to(device)
        seqs = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
        out += tokenizer.batch_decode(seqs[:, ids.shape[1] :], skip_special_tokens=True)
        if on_batch:
            on_batch(len(chunk))
    return out


def generate_vllm(source: ModelSource, tokenizer, prompts: list[list[int]], num_beams: int, max_new_tokens: int,
                  dtype: str, tensor_parallel: int) -> list[str]:
    """The same decoding through vLLM (optional; needs a GPU and ``pip install vllm``; untested here)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import BeamSearchParams
    except ImportError:
        raise UserError("--backend vllm: vLLM is not installed (pip install vllm), or use --backend hf") from None
    if source.kind == "checkpoint":
        raise UserError("--backend vllm: export the checkpoint first (allora-export --merged or --adapter) "
                        "and pass that directory")
    lora = None
    if source.kind == "peft":
        rank = json.loads((source.path / "adapter_config.json").read_text())["r"]
        llm = LLM(model=_base_dir(source), dtype=dtype, tensor_parallel_size=tensor_parallel,
                  enable_lora=True, max_lora_rank=max(16, rank))
        lora = LoRARequest("eval", 1, str(source.path))
    else:
        llm = LLM(model=str(source.path), dtype=dtype, tensor_parallel_size=tensor_parallel)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    if num_beams > 1:
        outs = llm.beam_search(inputs, BeamSearchParams(beam_width=num_beams, max_tokens=max_new_tokens),
                               lora_request=lora)
        gen = [o.sequences[0].tokens[len(p):] for o, p in zip(outs, prompts)]
    else:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                stop_token_ids=[tokenizer.convert_tokens_to_ids(EOT)] if EOT in tokenizer.get_vocab() else None)
        outs = llm.generate(inputs, params, lora_request=lora)
        gen = [list(o.outputs[0].token_ids) for o in outs]
    return tokenizer.batch_decode(gen, skip_special_tokens=True)
