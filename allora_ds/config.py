"""Typed run configuration: YAML file + ``dotted.key=value`` overrides -> validated dataclasses.

Every field's ``help`` is its documentation; ``allora-train --print-config-schema`` prints them.
Mistakes raise ``UserError`` naming the file, line and key (and the nearest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from allora_ds.adapters import AdapterSpec, AdapterSpecError
from allora_ds.errors import UserError
from allora_ds.fields import REQUIRED, documented
from allora_ds.sequence_parallel import PACKED_ULYSSES_ATTENTION


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = tuple(TORCH_DTYPES)


def is_local_path(value: str) -> bool:
    """Whether a model, tokenizer or data value is meant as a local path (not a hub id): ./, / or ~."""
    return value.startswith((".", "/", "~"))


@dataclass
class ModelConfig:
    path: str = documented(REQUIRED, "Base model: a local Hugging Face directory or a hub id (e.g. meta-llama/Meta-Llama-3-8B).")
    tokenizer: str | None = documented(None, "Tokenizer directory or hub id; defaults to model.path.")
    dtype: str = documented("bfloat16", "Precision of the frozen base and of training (float32, bfloat16, float16).", DTYPES)
    gradient_checkpointing: bool = documented(False, "Recompute activations in backward (HF gradient checkpointing).")
    mlp_tiles: int = documented(1, "Run each decoder layer's MLP over its tokens in this many slices (ALST's tiled MLP, "
                                   "allora_ds/tiled_mlp.py): its [tokens, intermediate] activations exist for one slice "
                                   "at a time, at the price of recomputing the MLP in backward. For long sequences, "
                                   "about tokens per GPU / hidden size; 1 = off.")
    activation_offload: bool = documented(False, "With gradient_checkpointing: keep each decoder layer's checkpointed "
                                                 "input in pinned host memory between forward and backward (ALST's "
                                                 "checkpoint offload, DeepSpeed's CheckpointHiddenStatesOffload; "
                                                 "allora_ds/activation_offload.py). Frees layers x tokens per GPU x "
                                                 "hidden x 2 bytes of GPU memory for as much host memory per GPU.")
    attn_implementation: str | None = documented(None, "transformers attention backend (sdpa, eager, flash_attention_2); "
                                                       "None = default.")
    trust_remote_code: bool = documented(False, "Allow model code from the hub repository to run. Off unless you trust it.")
    revision: str | None = documented(None, "Hub revision (branch, tag or commit) of model.path.")


FORMATS = ("alpaca", "chat", "sharegpt", "text")
# Attention backends that honour packed-example boundaries: transformers turns restarted position_ids
# into a block-diagonal mask (sdpa, eager, flex); flash attention gets one flattened row with
# cu_seq_lens (data.collate). None is transformers' default (sdpa).
PACKING_ATTENTION = (None, "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# true/false are the packing switch of earlier configs: true is greedy, false none.
PACKING = ("none", "greedy", "bfd", True, False)
TRAIN_ON = ("all_assistant", "last_assistant")
MIXING = ("first_exhausted", "all_exhausted")  # datasets.interleave_datasets' stopping strategies
FIELD_NAMES = ("instruction", "input", "output", "messages", "role", "content", "train")


@dataclass
class DataSource:
    """One item of ``data.train`` / ``data.eval`` when they are lists (a mixture of datasets)."""

    path: str = documented(REQUIRED, "A .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset name.")
    format: str | None = documented(None, "This source's format; None = data.format.", (None,) + FORMATS)
    split: str | None = documented(None, "Split of a hub dataset or directory; None = data.split.")
    text_field: str | None = documented(None, "Field of the document for format text; None = data.text_field.")
    fields: dict[str, str] | None = documented(None, "This source's field names (as data.fields); None = data.fields.")
    roles: dict[str, str] | None = documented(None, "This source's role names (as data.roles); None = data.roles.")
    weight: float | None = documented(None, "Sampling ratio among the weighted sources (datasets.interleave_datasets "
                                            "with data.mixing).")
    count: int | None = documented(None, "Take exactly this many examples: a seeded sample, the source repeated "
                                         "when it has fewer.")
    epochs: float | None = documented(None, "Take this many passes over the source (2 = twice; 0.5 = a seeded half).")

    def how_many(self) -> str:
        return next((f"{k} {getattr(self, k):g}" for k in ("weight", "count", "epochs") if getattr(self, k) is not None),
                    "all")


@dataclass
class DataConfig:
    train: str | list[dict] | None = documented(None, "Training data: a .jsonl/.json/.parquet/.csv file, a directory "
                                                "of them, a hub dataset name, or a list of sources (a mixture; keys "
                                                "under 'data.train[]' below). Required unless data.tokenized is set.")
    eval: str | list[dict] | None = documented(None, "Evaluation data (same forms as data.train); None = hold out "
                                                     "data.eval_fraction of train.")
    eval_fraction: float = documented(0.0, "Fraction of data.train held out for evaluation when data.eval is not set "
                                           "(of each source, before mixing).")
    split: str = documented("train", "Split to read from a hub dataset or a directory.")
    format: str = documented("alpaca", "alpaca (instruction/input/output), chat (messages, content a string or a list "
                                       "of text parts), sharegpt (conversations of from/value), both through the "
                                       "tokenizer's chat template, or text. A chat source holding 'conversations' "
                                       "is read as sharegpt.", FORMATS)
    text_field: str = documented("text", "Field holding the document for format text.")
    fields: dict[str, str] = documented({}, "The data's names for the fields a format reads, e.g. {instruction: "
                                        "question, output: answer} or {messages: dialog, role: speaker, content: "
                                        "text}; {train: NAME} names an optional per-message boolean: false excludes "
                                        f"that assistant turn from the loss. Keys: {', '.join(FIELD_NAMES)}.")
    roles: dict[str, str] = documented({}, "The data's role names mapped to system, user, assistant or tool, on top "
                                       "of the usual ones (human/user, gpt/assistant/bot, system, tool/function/"
                                       "observation/ipython), e.g. {customer: user, agent: assistant}.")
    train_on: str = documented("all_assistant", "Which assistant turns of a conversation carry loss: all_assistant "
                                                "or last_assistant.", TRAIN_ON)
    max_seq_len: int = documented(2048, "Sequences are truncated to this many tokens (the count is reported).")
    packing: bool | str = documented(False, "Pack several examples into each sequence (attention stays within each "
                                            "example): none (or false), greedy (in order; or true) or bfd (best-fit "
                                            "decreasing: fewer rows).", PACKING)
    mixing: str = documented("first_exhausted", "How weighted sources are interleaved (datasets' stopping strategy): "
                                                "first_exhausted stops when one runs out (nothing repeats), "
                                                "all_exhausted repeats the others until every one was seen whole.",
                             MIXING)
    num_proc: int = documented(1, "Processes for tokenization (datasets.map).")
    tokenized: str | None = documented(None, "A directory written by `allora-data CONFIG --save DIR`: train on it "
                                             "without tokenizing (after checking tokenizer, template, format, "
                                             "max_seq_len and packing).")
    tokenize_timeout_minutes: float = documented(240.0, "How long the other ranks wait for the rank that tokenizes "
                                                 "(a wait of its own, not train.collective_timeout_minutes).")

    @property
    def packing_strategy(self) -> str:
        return {True: "greedy", False: "none"}.get(self.packing, self.packing)

    def sources(self, which: str = "train", loc: str = "") -> list[DataSource]:
        """``data.train`` or ``data.eval`` as sources, each with this section's defaults filled in.

        ``loc``: where the key was written (file:line), for error messages, which name the source
        by its index and path.
        """
        value = getattr(self, which)
        if value is None:
            return []
        items = [{"path": value}] if isinstance(value, str) else value
        at = f"{loc}: " if loc else ""
        out = []
        for i, item in enumerate(items):
            where = f"data.{which}" if isinstance(value, str) else f"data.{which}[{i}]"
            src = _typed(DataSource, item, lambda name: loc or "<config>", f"{where}.")
            if src.path in (None, ""):
                raise UserError(f"{at}{where}: path is required ({_help(DataSource, 'path')})")
            if sum(getattr(src, k) is not None for k in ("weight", "count", "epochs")) > 1:
                raise UserError(f"{at}{where} ({src.path}): give one of weight, count or epochs, not several")
            for k in ("weight", "epochs", "count"):
                if getattr(src, k) is not None and not getattr(src, k) > 0:
                    raise UserError(f"{at}{where}.{k} ({src.path}): must be > 0, got {getattr(src, k)}")
            src.format = src.format or self.format
            src.split = src.split or self.split
            src.text_field = src.text_field or self.text_field
            src.fields = {**self.fields, **(src.fields or {})}
            src.roles = {**self.roles, **(src.roles or {})}
            unknown = sorted(set(src.fields) - set(FIELD_NAMES))
            if unknown:
                raise UserError(f"{at}{where}: fields: unknown field {unknown[0]!r} (valid: {', '.join(FIELD_NAMES)})")
            out.append(src)
        if isinstance(value, list) and not out:
            raise UserError(f"{at}data.{which}: the list of sources is empty")
        return out

    def train_formats(self) -> list[str]:
        """The formats the training data is in: one per mixture source (in order, once each), or
        ``format`` (also for ``data.tokenized``, which checks it against what was tokenized)."""
        return list(dict.fromkeys(s.format for s in self.sources("train"))) or [self.format]

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        """The section as a run saved it (keys a newer version added take their defaults)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


SCHEDULERS = ("cosine", "linear", "constant")
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # allora_ds/trackers.py
NONFINITE = ("stop", "skip")


@dataclass
class TrainConfig:
    output_dir: str = documented("runs/allora", "Run directory: metrics.jsonl, checkpoints/, ds_config.json, export/.")
    deepspeed: str = documented("zero3_bf16", "DeepSpeed JSON: a path, or the name of a shipped config (zero3_bf16, "
                                              "zero3_hpz_bf16, "
                        "zero3_cpu, zero3_offload_bf16, zero2_bf16); its \"auto\" values are filled from this config.")
    micro_batch_size: int = documented(1, "Sequences per rank per forward pass.")
    gradient_accumulation_steps: int = documented(1, "Micro-batches per optimizer step.")
    lr: float = documented(1e-4, "Peak learning rate (the paper's base rate l_b; ALLoRA's effective rate at 0 is eta*lr).")
    epochs: int = documented(1, "Passes over the training data (ignored when train.max_steps > 0).")
    max_steps: int = documented(-1, "Stop after this many optimizer steps; -1 = run train.epochs.")
    warmup_steps: int = documented(0, "Linear warmup steps.")
    scheduler: str = documented("cosine", "Learning-rate schedule after warmup.", SCHEDULERS)
    weight_decay: float = documented(0.0, "AdamW weight decay.")
    adam_betas: list[float] = documented([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = documented(1.0, "Gradient clipping (global norm); 0 = off.")
    seed: int = documented(42, "Seed for adapter init, data order and dropout.")
    log_steps: int = documented(10, "Write metrics every this many steps.")
    eval_steps: int = documented(0, "Evaluate every this many steps; 0 = only at the end.")
    save_steps: int = documented(0, "Checkpoint every this many steps; 0 = only at the end.")
    keep_last: int = documented(2, "Checkpoints to keep (oldest deleted first).")
    resume: str = documented("auto", "auto (newest complete checkpoint in output_dir), never, or a checkpoint path.")
    overwrite_output_dir: bool = documented(False, "A run that does not continue the checkpoints already in output_dir "
                                           "(train.resume=never, or a resume from an older one) moves that directory "
                                           "aside to OUTPUT_DIR.replaced-TIME first; without this it is refused.")
    resume_allow_changes: list[str] = documented([], "Keys (e.g. data.train) allowed to differ from the checkpoint's config "
                                                     "on resume.")
    nonfinite: str = documented("stop", "On a non-finite loss: stop (keep the last good checkpoint) or skip the step.", NONFINITE)
    chunked_loss: bool = documented(True, "LM head + cross-entropy only at labelled positions, in chunks (allora_ds/loss.py): "
                                  "transformers' loss and gradients without its [tokens, vocab] fp32 logits. false = "
                                  "transformers' loss. Models other than Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3/OLMo-2, or "
                                  "with an adapter on lm_head, keep transformers' loss (printed at start).")
    sequence_parallel_size: int = documented(1, "Ranks that share each sequence (DeepSpeed Ulysses): every activation "
                                             "is split over them, for sequences one GPU cannot hold; must divide the "
                                             "world and tile nodes. The data-parallel size is world / this "
                                             "(allora_ds/sequence_parallel.py).")
    collective_timeout_minutes: float = documented(30.0, "How long a rank may wait in one collective (e.g. while rank 0 "
                                                 "tokenizes a large dataset) before the job is aborted.")
    report_to: list[str] = documented(["tensorboard"], "Trackers that get the metrics.jsonl scalars and the config, "
                                      "on rank 0: tensorboard (when installed), wandb, mlflow (pip install "
                                      "'allora-ds[wandb]' / '[mlflow]'); [] = none. A resumed run continues the "
                                      "same tracker run.")
    peak_tflops: float = documented(0.0, "Peak TFLOP/s of one device for the MFU figure; 0 = the datasheet dense bf16 peak "
                                 "of a known GPU (see allora_ds/flops.py), not reported on others.")


@dataclass
class ExportConfig:
    merged: bool = documented(False, "At the end of training, write a merged Hugging Face model to output_dir/export/merged.")
    adapter: bool = documented(False, "At the end of training, write a PEFT adapter to output_dir/export/adapter.")
    dtype: str | None = documented(None, "dtype of the merged export; None = the base model's.", (None,) + DTYPES)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "adapter": AdapterSpec, "data": DataConfig, "train": TrainConfig,
            "export": ExportConfig}


def _yaml_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every ``section.key`` in a YAML mapping, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _loc(source: str, lines: dict[str, int], key: str) -> str:
    return f"{source}:{lines[key]}" if key in lines else source


def _where(source: str, lines: dict[str, int], key: str) -> str:
    return f"{_loc(source, lines, key)}: {key}"


# Names users bring from the HF Trainer / PEFT, mapped to ours, for "did you mean".
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
           "batch_size": "micro_batch_size", "logging_steps": "log_steps", "save_total_limit": "keep_last",
           "lr_scheduler_type": "scheduler", "max_length": "max_seq_len", "r": "rank", "lora_r": "rank",
           "lora_alpha": "alpha", "lora_dropout": "dropout", "model_name_or_path": "path", "torch_dtype": "dtype",
           "dataset": "train", "train_file": "train", "resume_from_checkpoint": "resume", "deepspeed_config": "deepspeed"}


def _nearest(key: str, valid: list[str]) -> str:
    sec, _, name = key.rpartition(".")
    alias = f"{sec}.{ALIASES[name]}" if sec and name in ALIASES else ALIASES.get(name)
    m = [alias] if alias in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alt in inner[1:]:  # the first alternative that takes the value's kind (str | list[dict], bool | str)
            try:
                return _coerce(value, alt, where) if _kind_fits(value, alt) else _coerce(value, inner[0], where)
            except UserError:
                continue
        return _coerce(value, inner[0], where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (str, Any)
        return {_coerce(k, kt, where): v if vt is Any else _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp}")


def _kind_fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the kind ``tp`` reads (a list for list types, a mapping for dicts, ...)."""
    origin = typing.get_origin(tp) or tp
    kinds = {list: (list, tuple), dict: (dict,), bool: (bool,), str: (str,)}
    return isinstance(value, kinds.get(origin, ()))


def _help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _typed(cls, body: Any, loc, prefix: str):
    """``cls(**body)`` with every value coerced to its field's type and checked against its choices.

    ``loc(name)`` says where key ``name`` was written (file:line, or "override"), ``prefix`` is the
    keys' dotted prefix (``"adapter."``, ``"data.train[1]."``), for error messages.
    """
    if not isinstance(body, dict):
        raise UserError(f"{loc('')}: {prefix.rstrip('.')}: expected a mapping of keys, got {body!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in body.items():
        name = str(name)
        if name not in fields:
            full = [f"{prefix}{f}" for f in fields]
            raise UserError(f"{loc(name)}: unknown key {prefix}{name}{_nearest(f'{prefix}{name}', full)}")
        where = f"{loc(name)}: {prefix}{name}"
        v = _coerce(value, hints[name], where)
        choices = fields[name].metadata.get("choices")
        if choices and v not in choices:
            raise UserError(f"{where}: {v!r} is not one of {', '.join(str(c) for c in choices)}")
        kwargs[name] = v
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[str, Any]:
    key, eq, raw = item.partition("=")
    if not eq or "." not in key:
        raise UserError(f"override {item!r}: expected section.key=value, e.g. train.lr=2e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read YAML ``path`` (or start from ``base``), apply overrides, validate -> ``Config``."""
    raw: dict = dict(base or {})
    source, lines = "<config>", {}
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"config file {p}: {e.strerror or e}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{p}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
        lines = _yaml_lines(text)
    values: dict[str, dict] = {}
    origins: dict[str, str] = {}  # "section.key" -> where its value came from, for error messages
    for sec, body in raw.items():
        if sec not in SECTIONS:
            raise UserError(f"{_where(source, lines, str(sec))}: unknown section{_nearest(str(sec), list(SECTIONS))}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise UserError(f"{_where(source, lines, sec)}: expected a mapping of keys, got {body!r}")
        for k, v in body.items():
            values.setdefault(sec, {})[str(k)] = v
            origins[f"{sec}.{k}"] = _loc(source, lines, f"{sec}.{k}")
    for item in overrides:
        key, value = _parse_override(item)
        sec, _, name = key.partition(".")
        if sec not in SECTIONS:
            raise UserError(f"override {key}: unknown section {sec!r}{_nearest(sec, list(SECTIONS))}")
        values.setdefault(sec, {})[name] = value
        origins[key] = "override"
    sections = {}
    for sec, body in values.items():
        try:
            sections[sec] = _typed(SECTIONS[sec], body, lambda name, sec=sec: origins[f"{sec}.{name}"], f"{sec}.")
        except AdapterSpecError as e:
            key = f"adapter.{e.field}"
            raise UserError(f"{origins.get(key, source)}: {key}: {e.detail}") from None
    cfg = Config(**sections)
    _validate(cfg, lambda key: origins.get(key, source))
    return cfg


def _validate(cfg: Config, origin) -> None:
    def bad(key: str, msg: str):
        raise UserError(f"{origin(key)}: {key}: {msg}")

    for sec in SECTIONS:
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            if f.metadata.get("required") and getattr(obj, f.name) in (None, ""):
                bad(f"{sec}.{f.name}", f"is required ({f.metadata['help']})")
    t = cfg.train
    for key in ("micro_batch_size", "gradient_accumulation_steps", "log_steps", "keep_last", "epochs",
                "sequence_parallel_size"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("warmup_steps", "eval_steps", "save_steps"):
        if getattr(t, key) < 0:
            bad(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.max_steps == 0 or t.max_steps < -1:
        bad("train.max_steps", f"must be -1 (use epochs) or >= 1, got {t.max_steps}")
    if not t.lr > 0:
        bad("train.lr", f"must be > 0, got {t.lr}")
    if t.max_grad_norm < 0:
        bad("train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        bad("train.adam_betas", f"must be two numbers in [0, 1), got {t.adam_betas}")
    if cfg.model.mlp_tiles < 1:
        bad("model.mlp_tiles", f"must be >= 1, got {cfg.model.mlp_tiles}")
    if cfg.model.activation_offload and not cfg.model.gradient_checkpointing:
        bad("model.activation_offload", "needs model.gradient_checkpointing=true: what it moves to host memory are "
            "the layer inputs checkpointing keeps")
    if cfg.data.max_seq_len < 2:
        bad("data.max_seq_len", f"must be >= 2, got {cfg.data.max_seq_len}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        bad("data.eval_fraction", f"must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.data.packing_strategy != "none" and cfg.model.attn_implementation not in PACKING_ATTENTION:
        bad("model.attn_implementation", f"{cfg.model.attn_implementation!r} is not known to keep packed examples "
            f"apart; with data.packing use one of {', '.join(a for a in PACKING_ATTENTION if a)} (or null: sdpa)")
    if (t.sequence_parallel_size > 1 and cfg.data.packing_strategy != "none"
            and cfg.model.attn_implementation not in PACKED_ULYSSES_ATTENTION):
        bad("data.packing", f"packed rows with train.sequence_parallel_size > 1 need model.attn_implementation "
            f"{' or '.join(PACKED_ULYSSES_ATTENTION)}: DeepSpeed's Ulysses masks sdpa and flex attention causally "
            "over the whole row, so packed examples would attend to each other")
    if not cfg.train.collective_timeout_minutes > 0:
        bad("train.collective_timeout_minutes", f"must be > 0, got {cfg.train.collective_timeout_minutes}")
    if cfg.train.peak_tflops < 0:
        bad("train.peak_tflops", f"must be >= 0, got {cfg.train.peak_tflops}")
    unknown = [t for t in cfg.train.report_to if t not in REPORT_TO]
    if unknown:
        bad("train.report_to", f"{unknown[0]!r} is not one of {', '.join(REPORT_TO)}")
    if cfg.data.num_proc < 1:
        bad("data.num_proc", f"must be >= 1, got {cfg.data.num_proc}")
    if cfg.data.train in (None, "", []) and not cfg.data.tokenized:
        bad("data.train", f"is required ({_help(DataConfig, 'train')})")
    for which in ("train", "eval"):
        cfg.data.sources(which, origin(f"data.{which}"))
    if not cfg.data.tokenize_timeout_minutes > 0:
        bad("data.tokenize_timeout_minutes", f"must be > 0, got {cfg.data.tokenize_timeout_minutes}")


def schema_text() -> str:
    """Every config key with its type, default and help, for ``--print-config-schema``."""
    out = []
    for sec, cls in SECTIONS.items():
        out.append(f"{sec}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = "(required)" if f.metadata.get("required") else repr(
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            out.append(f"  {f.name}: {tp} = {default}\n      {f.metadata['help']}")
        if cls is DataConfig:
            out.append("  data.train[] / data.eval[]: each source of a list")
            out += [f"    {f.name}: {f.metadata['help']}" for f in dataclasses.fields(DataSource)]
    return "\n".join(out)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
