"""DeepSpeed JSON config: read it, fill its ``"auto"`` values from our config, check conflicts.

The trainer owns batch sizes, learning rate, clipping, precision and the LR schedule; the JSON
owns the ZeRO stage, offload and communication settings. A value set in both must agree.

``train.deepspeed`` is a path or the name of a config shipped with the package (``zero3_bf16``,
``zero3_cpu.json``, ...): an installed ``allora-train`` runs from any directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from allora_ds.config import Config
from allora_ds.errors import UserError

AUTO = "auto"
_PACKAGE = Path(__file__).resolve().parent


def shipped_dir() -> Path:
    """The DeepSpeed configs that come with allora_ds.

    setup.py installs the repository's ``ds_configs/`` as ``allora_ds/ds_configs``; in a source
    checkout (also under ``pip install -e``) they are at the repository root beside the package.
    """
    installed = _PACKAGE / "ds_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "ds_configs"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.json"))


def resolve_ds_config(name: str | Path) -> Path:
    """An existing path wins; else a bare name, with or without ``.json``, names a shipped config."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    stem = p.name.removesuffix(".json")
    if p.name == str(name) and stem in shipped_names():  # bare: no directory part
        return shipped_dir() / f"{stem}.json"
    raise UserError(f"train.deepspeed: cannot read {name}: no such file, and not the name of a shipped config "
                    f"({', '.join(shipped_names())})")


def read_ds_config(path: str | Path) -> dict:
    p = resolve_ds_config(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"train.deepspeed: cannot read {p}: {e.strerror or e}") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"{p}: expected a JSON object, got {type(ds).__name__}")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _fill(ds: dict, key: str, value, path: Path, what: str) -> None:
    """Set ``ds[key]`` if absent or "auto"; an explicit different value is a conflict."""
    current = ds.get(key, AUTO)
    if current == AUTO:
        ds[key] = value
    elif current != value:
        raise UserError(f"{path}: {key} is {current!r} but {what} gives {value!r}; set it to \"auto\" or make them agree")


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node, as the launcher says (deepspeed: LOCAL_SIZE, torchrun: LOCAL_WORLD_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return world_size


def zero3_auto_values(hidden_size: int, rank: int, world_size: int, per_node: int) -> dict:
    """What "auto" means in ``zero_optimization``, from the model's hidden size ``h`` and the adapter rank.

    Sized for adapters on a frozen Llama-3 base (measured in bench/comm.py, predicted by allora-plan):
    * ``layer`` = 13 h^2 elements, one Llama-3 decoder layer (exact for 8B, 2% over for 70B);
    * prefetch one layer ahead, so the next layer's all-gather overlaps this layer's compute
      (transformers' 0.9 h^2 is less than one MLP weight of 3.5 h^2);
    * at most 3 layers gathered at once (the one computing, the one prefetched, one kept for
      reuse); a fixed 1e9 elements is 4.6 layers of 8B but only 1.2 of 70B, too few to prefetch;
    * keep a gathered weight if it is used again within one layer's worth of the trace (the last
      layer across the forward/backward turnaround); beyond that the memory buys little traffic;
    * parameters of at most r x 4h elements stay whole on every rank: every adapter matrix (the
      largest is r x intermediate, 3.5h in Llama-3 8B/70B, 4h in Llama-3.2-1B) and the norms, but
      no base weight (the smallest, k_proj, has h^2/4). Whole adapters are gathered once per
      optimizer step instead of with their layer in every forward and backward;
    * hpZ (``zero_hpz_partition_size``): the ranks of one node, so that after the first step the
      frozen base is gathered inside a node only; 1 (off) on a single node.
    """
    layer = 13 * hidden_size * hidden_size
    return {"reduce_bucket_size": hidden_size * hidden_size,  # a layer's adapter gradients in one bucket
            "stage3_prefetch_bucket_size": layer,
            "stage3_max_live_parameters": 3 * layer,
            "stage3_max_reuse_distance": layer,
            "stage3_param_persistence_threshold": rank * 4 * hidden_size,
            "zero_hpz_partition_size": per_node if world_size > per_node else 1}


def fill_ds_config(ds: dict, cfg: Config, world_size: int, hidden_size: int, path: str | Path,
                   per_node: int | None = None) -> dict:
    """Return a copy of ``ds`` with every "auto" resolved; raises ``UserError`` on conflicts.

    ``per_node``: ranks per node (default: what the launcher set, else ``world_size``)."""
    ds = json.loads(json.dumps(ds))
    try:  # messages name the file that was read, also for a bare name
        path = resolve_ds_config(path)
    except UserError:
        path = Path(path)
    t = cfg.train
    if "scheduler" in ds:
        raise UserError(f"{path}: remove the \"scheduler\" section; the schedule comes from train.scheduler and "
                        "train.warmup_steps")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, path, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps, path, "train.gradient_accumulation_steps")
    # DeepSpeed counts the batch over data-parallel ranks: the ranks of a sequence-parallel group share rows.
    dp = world_size // t.sequence_parallel_size
    if t.sequence_parallel_size > 1:  # zero.Init reads the batch before the engine has the groups (mpu)
        _fill(ds, "sequence_parallel_size", t.sequence_parallel_size, path, "train.sequence_parallel_size")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * dp, path,
          f"micro_batch_size x gradient_accumulation_steps x data-parallel size {dp}")
    _fill(ds, "gradient_clipping", t.max_grad_norm, path, "train.max_grad_norm")
    for prec in ("bf16", "fp16"):
        want = cfg.model.dtype == {"bf16": "bfloat16", "fp16": "float16"}[prec]
        section = ds.setdefault(prec, {})
        if section.get("enabled", AUTO) == AUTO:
            section["enabled"] = want
        elif bool(section["enabled"]) != want:
            raise UserError(f"{path}: {prec}.enabled is {section['enabled']} but model.dtype is {cfg.model.dtype}")
    # torch's AdamW when the JSON names none: DeepSpeed's default AdamW is FusedAdam, JIT-built with nvcc.
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", t.lr), ("betas", list(t.adam_betas)), ("eps", 1e-8), ("weight_decay", t.weight_decay)):
        _fill(params, key, value, path, f"train config ({key})")
    zero = ds.setdefault("zero_optimization", {})
    auto = zero3_auto_values(hidden_size, cfg.adapter.rank, world_size, per_node or ranks_per_node(world_size))
    for key, value in auto.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    leftover = [k for k, v in _walk(ds) if v == AUTO]
    if leftover:
        raise UserError(f"{path}: no value to fill \"auto\" for {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
