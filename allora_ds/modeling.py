"""Load the base model and tokenizer (partitioned under ZeRO-3) and apply the adapters."""

from __future__ import annotations

import contextlib
from pathlib import Path

from allora_ds import log, tiled_mlp
from allora_ds.adapters import inject_adapters
from allora_ds.config import TORCH_DTYPES, Config, ModelConfig, is_local_path
from allora_ds.errors import UserError
from allora_ds.loss import install as install_chunked_loss

# Llama-3.1+ reserve this token for padding; older tokenizers fall back to eos (padding is masked anyway).
LLAMA3_PAD = "<|finetune_right_pad_id|>"
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _source(path: str, what: str) -> str:
    """A local directory must exist and hold the file transformers needs; anything else is a hub id."""
    p = Path(path).expanduser()
    if p.exists() or is_local_path(path) or path.count("/") > 1:
        if not p.is_dir():
            raise UserError(f"{what}: {path} is not a directory (expected a Hugging Face model directory)")
        return str(p)
    return path


def load_model_config(mc: ModelConfig):
    """The base model's ``PretrainedConfig`` (cheap: reads config.json only)."""
    from transformers import AutoConfig

    src = _source(mc.path, "model.path")
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load a model config from {mc.path!r}: {str(e).splitlines()[0]}") from None
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise UserError(f"model.path: {mc.path} is a {config.architectures or config.model_type}, "
                        "not a causal language model (*ForCausalLM)")
    return config


def load_tokenizer(mc: ModelConfig):
    from transformers import AutoTokenizer

    name = mc.tokenizer or mc.path
    src = _source(name, "model.tokenizer" if mc.tokenizer else "model.path")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = LLAMA3_PAD if LLAMA3_PAD in tok.get_vocab() else tok.eos_token
    tok.padding_side = "right"
    return tok


def stop_token_ids(tok, data_format: str) -> list[int]:
    """The tokens that a finetune on ``data_format`` teaches the model to end its response with.

    alpaca and text responses end with the tokenizer's EOS (``data.Formatter`` appends it); a chat
    reply ends with the special tokens the chat template writes right after it (Llama-3:
    ``<|eot_id|>``, ChatML: ``<|im_end|>``), which are labelled with the reply.
    """
    if data_format not in ("chat", "sharegpt"):  # both are rendered by the chat template
        return [] if tok.eos_token_id is None else [tok.eos_token_id]
    reply = "allora reply"
    text = tok.apply_chat_template([{"role": "user", "content": "allora prompt"}, {"role": "assistant", "content": reply}],
                                   tokenize=False)
    end = text.rfind(reply) + len(reply)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    ids = []
    for t, (start, _) in zip(enc.input_ids, enc.offset_mapping):
        if start >= end:
            if t not in special:
                break
            ids.append(t)
    return ids


def load_model(cfg: Config, ds_config: dict, verbose: bool = True, architecture=None):
    """Base model from ``cfg.model`` with adapters from ``cfg.adapter`` injected.

    ``architecture``: a ``PretrainedConfig`` to build with random weights instead of loading
    ``model.path`` (the benchmarks' models, which have no checkpoint).

    Under ZeRO-3 transformers creates the model inside ``deepspeed.zero.Init`` (because an
    ``HfDeepSpeedConfig`` is alive) so every rank holds only its partition from the start, and
    the adapters are created inside ``zero.Init`` too. Returns ``(model, keepalive)``: hold on
    to ``keepalive`` until ``deepspeed.initialize`` has run.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    mc = cfg.model
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keepalive = HfDeepSpeedConfig(ds_config) if zero3 else None
    kwargs = base_load_kwargs(mc, zero3)
    try:
        if architecture is not None:  # created where from_pretrained puts the weights (zero.Init: its partitions)
            import torch

            with torch.device(kwargs["device_map"][""]) if "device_map" in kwargs else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_config(architecture, dtype=kwargs["dtype"],
                                                         attn_implementation=mc.attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(_source(mc.path, "model.path"), **kwargs)
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        raise UserError(f"model.attn_implementation: {mc.attn_implementation}: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load weights from {mc.path!r}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    if mc.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With hpZ (zero_hpz_partition_size > 1) every zero.Init creates the intra-node group unless it
    # is given one, and DeepSpeed refuses a second: reuse the one from_pretrained's zero.Init made.
    from deepspeed.utils import groups

    hpz = zero3 and int(ds_config["zero_optimization"].get("zero_hpz_partition_size", 1)) > 1
    hpz_group = groups._get_zero_param_intra_parallel_group() if hpz else None
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3, zero_param_parallel_group=hpz_group):
            counts = inject_adapters(model, cfg.adapter, seed=cfg.train.seed, verbose=verbose)
    except ValueError as e:
        raise UserError(f"adapter.target_modules: {e}") from None
    if mc.mlp_tiles > 1:  # after the adapters: their gradients are the ones the tiles accumulate
        tiled_mlp.install(model, mc.mlp_tiles)
    if cfg.train.chunked_loss:  # after the adapters: an adapter on lm_head keeps transformers' loss
        reason = install_chunked_loss(model)
        if reason and verbose:
            log.info(f"train.chunked_loss: keeping transformers' loss: {reason}", every_rank=True)
    return model, keepalive, counts


def base_load_kwargs(mc: ModelConfig, zero3: bool) -> dict:
    """``from_pretrained``'s arguments for the base model.

    Without ZeRO-3 every rank holds the whole base: it is read from the file straight onto this
    rank's device (DeepSpeed's current device, set from LOCAL_RANK by init_distributed). Loaded
    into host memory first, the 8 ranks of an 8B node would each hold a 16 GB copy in RAM before
    deepspeed.initialize moved it; this way the node holds the file's pages once, in its page
    cache. Under ZeRO-3, zero.Init partitions the weights as they are created (no device_map).
    """
    kwargs = dict(dtype=TORCH_DTYPES[mc.dtype], trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    if not zero3:
        from deepspeed.accelerator import get_accelerator

        kwargs["device_map"] = {"": get_accelerator().current_device_name()}
    return kwargs


# train.scheduler -> the name transformers.get_scheduler knows it by
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_engine(cfg: Config, ds_config: dict, model, total_steps: int, mpu=None):
    """The DeepSpeed engine over ``model``'s trainable parameters, with the config's LR schedule.

    ``mpu``: DeepSpeed's sequence-parallel groups (sequence_parallel.ulysses_attention), or None."""
    import deepspeed
    from transformers import get_scheduler

    tc = cfg.train
    sched = SCHEDULERS[tc.scheduler]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config, mpu=mpu,
        lr_scheduler=lambda opt: get_scheduler(sched, opt, num_warmup_steps=tc.warmup_steps,
                                               num_training_steps=total_steps),
    )
    # from_pretrained leaves the model in eval mode, where transformers skips gradient checkpointing
    # and dropout is off; evaluate() switches back to train mode, so the steps before it need this too.
    engine.train()
    return engine


def flat_batches(model) -> bool:
    """Whether micro-batches reach ``model`` flattened into one row (flash attention; see data.collate)."""
    return model.config._attn_implementation in FLASH_ATTENTION


def discard_step(engine) -> None:
    """End the optimizer step without applying it: its gradients are dropped, the weights, the
    optimizer state and the LR schedule do not move, and the next step starts from zero gradients.

    ``zero_grad`` is not enough under ZeRO-1/2: with a gradient accumulation dtype (fp32 in our
    bf16 configs) the reduced partitions live in ``averaged_gradients`` and the micro-step count in
    the optimizer, and the next step would add onto the dropped (non-finite) sum; DeepSpeed would
    then skip that step too ("OVERFLOW!") while we count it applied. So each ZeRO optimizer is left
    as its own overflow branch leaves it (DeepSpeed 0.19: stage_1_and_2.py ``step``, stage3.py
    ``_overflow_clean_up``); tests/integration/test_layouts.py runs this on every shipped layout.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        opt._overflow_clean_up(opt.loss_scale)  # zero_grad (micro_step_id = 0), then the fp32 partitions
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt._offload_accumulated_param_ids = set()
            opt.reset_cpu_buffers()
        else:
            for k in opt.averaged_gradients:
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
    elif engine.bfloat16_enabled() or engine.fp16_enabled():
        opt.zero_grad()  # BF16_Optimizer / FP16_Optimizer: their fp32 gradient buffers too
    else:
        engine.zero_grad()
    engine.micro_steps += 1  # the boundary micro-step happened; the next step starts afresh
