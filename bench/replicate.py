"""Miniature replication of ALLoRA (arXiv 2410.09692): LoRA variants vs ALLoRA, few steps, little data.

    .venv/bin/python bench/replicate.py            # full run (~11 min on 2 CPU cores): JSON, plots, docs/results.md
    .venv/bin/python bench/replicate.py --quick --out /tmp/r/replicate_quick.json    # smoke test, ~1 min
    .venv/bin/python bench/replicate.py --report-only     # plots and docs/results.md again from the JSON

A small Llama-3-architecture model is pretrained once on a synthetic corpus (cached under
bench/cache/; see bench/replication_task.py for the world, the corpus and the task), then
finetuned with adapters on every query/key/value/output/MLP projection for a held-out
downstream classification task, for every combination of

  * method: 8 adapter configurations (METHODS below: LoRA with and without dropout, LoRA x eta,
    ALLoRA with eta^2 in {1, 2, 4}, ALLoRA-OD),
  * optimizer: AdamW and SGD (momentum 0.9), each over a small learning-rate grid shared by all
    methods (Settings.lr_grid),
  * budget: two numbers of finetuning steps ("few", "more"), each a complete run with its own
    warmup + linear-decay schedule,
  * seed: adapter init and batch order (the data are the same for all seeds).

For each (method, optimizer, budget) the learning rate with the best mean validation accuracy is
selected and its test accuracy reported as mean +- std over seeds; the same comparison at one
fixed learning rate per optimizer is reported too. Runs are single-threaded and independent, so
they are spread over ``--workers`` processes and give the same numbers for any worker count.

Outputs: JSON (--out, default bench/results/replicate.json), PNGs under <docs>/img/ and the
generated block of <docs>/results.md (between the ``replicate:begin/end`` markers; text outside
them is kept). ``--docs`` defaults to docs/ for the full run, to a folder beside --out with --quick.
``--report-only`` redoes the PNGs and the block from an existing JSON. Prints the accuracy table last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from allora_ds.adapters import (  # noqa: E402
    AdapterSpec, adapter_modules, inject_adapters, row_norms_of_product, scale_diagnostics,
)
from bench.common import cpu_model  # noqa: E402
from bench.replication_task import (  # noqa: E402
    LABELS, BaseSettings, build_base, encode, evaluate, label_logits, label_token_ids, make_task,
)

RANK = 8
SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    spec: dict  # AdapterSpec fields besides rank

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(rank=RANK, **self.spec)


# "The usual alpha" is alpha = 2r. LoRA x eta is plain LoRA with alpha/r = eta and no dropout; at
# eta = 2 it is the same configuration as "LoRA, no dropout", so that run is not repeated.
METHODS = (
    Method("lora", "LoRA (alpha=2r, dropout 0.05)", dict(method="lora", alpha=2.0 * RANK, dropout=0.05)),
    Method("lora_nodrop", "LoRA (alpha=2r, no dropout) = LoRA x2", dict(method="lora", alpha=2.0 * RANK)),
    Method("lora_x1", "LoRA x1 (alpha=r)", dict(method="lora", alpha=1.0 * RANK)),
    Method("lora_x1.41", "LoRA x1.41 (alpha=1.41r)", dict(method="lora", alpha=SQRT2 * RANK)),
    Method("allora_eta2_1", "ALLoRA eta^2=1", dict(method="allora", eta=1.0)),
    Method("allora_eta2_2", "ALLoRA eta^2=2", dict(method="allora", eta=SQRT2)),
    Method("allora_eta2_4", "ALLoRA eta^2=4", dict(method="allora", eta=2.0)),
    Method("allora_od", "ALLoRA-OD eta=2", dict(method="allora_od", eta=2.0)),
)
METHOD_BY_NAME = {m.name: m for m in METHODS}
OPTIMIZERS = ("adamw", "sgd")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Settings:
    base: BaseSettings = field(default_factory=BaseSettings)
    n_train: int = 256
    n_val: int = 200
    n_test: int = 400
    task_seed: int = 0
    batch: int = 16
    budgets: tuple[tuple[str, int], ...] = (("few", 16), ("more", 48))  # 1 and 3 epochs of n_train
    seeds: int = 5
    # Learning-rate grids, identical for every method; the middle value is the "fixed LR".
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = (("adamw", (1e-3, 3e-3, 1e-2)), ("sgd", (0.003, 0.01, 0.03)))
    warmup_fraction: float = 0.1

    def lrs(self, optimizer: str) -> tuple[float, ...]:
        return dict(self.lr_grid)[optimizer]

    def fixed_lr(self, optimizer: str) -> float:
        grid = self.lrs(optimizer)
        return grid[len(grid) // 2]


FULL = Settings()
QUICK = Settings(
    base=BaseSettings(hidden=32, corpus_lines=2000, steps=40, batch=16),
    n_train=64, n_val=40, n_test=80, budgets=(("few", 6), ("more", 16)), seeds=1,
    lr_grid=(("adamw", (1e-2,)), ("sgd", (0.03,))),
)


@dataclass(frozen=True)
class Job:
    method: str
    optimizer: str
    lr: float
    budget: str
    steps: int
    seed: int
    init: str = "pretrained"  # or "random": the control without pretraining


# ---------------------------------------------------------------- one finetuning run (in a worker)

_STATE: dict = {}


def init_worker(base_dir: str, settings: Settings) -> None:
    """Load the base, tokenizer and encoded task once per worker process."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)  # one thread per run: deterministic, and the runs fill the cores instead
    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    torch.manual_seed(0)  # the same random-weights control model in every worker
    random_base = LlamaForCausalLM(base.config).eval()
    task = make_task(settings.n_train, settings.n_val, settings.n_test, seed=settings.task_seed)
    _STATE.update(
        settings=settings, base=base, random_base=random_base,
        label_ids=label_token_ids(tok), train=encode(tok, task.train), val=encode(tok, task.val),
        test=encode(tok, task.test),
    )


def quiet_transformers() -> None:
    """No per-load progress bars: one per worker and run would drown the progress lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches from successive shuffles of the training set (a pure function of seed)."""
    g = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch:
        flat += torch.randperm(n, generator=g).tolist()
    return [torch.tensor(flat[i * batch : (i + 1) * batch]) for i in range(steps)]


def lr_factor(steps: int, warmup_fraction: float):
    """Linear warmup, then linear decay to 0 at the end of the budget."""
    warmup = max(1, round(warmup_fraction * steps))
    return lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    # No weight decay for either: it would be one more knob interacting with the adapter scale.
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def update_row_norms(modules) -> torch.Tensor:
    """``||(s B A)_i||`` over every output row of every adapter: the rows of the effective update."""
    return torch.cat([m.spec.scale * row_norms_of_product(m.lora_A, m.lora_B) for m in modules])


def finetune(job: Job) -> dict:
    st = _STATE
    s: Settings = st["settings"]
    t0 = time.perf_counter()
    torch.manual_seed(job.seed)  # LoRA dropout masks
    model = copy.deepcopy(st["base"] if job.init == "pretrained" else st["random_base"])
    inject_adapters(model, METHOD_BY_NAME[job.method].adapter_spec(), seed=job.seed, verbose=False)
    modules = list(adapter_modules(model).values())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(job.optimizer, params, job.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(job.steps, s.warmup_fraction))
    train, label_ids = st["train"], st["label_ids"]
    losses, norm_mean, norm_max = [], [0.0], [0.0]
    model.train()
    for idx in batch_order(len(train.labels), s.batch, job.steps, job.seed):
        loss = F.cross_entropy(label_logits(model, train.rows(idx), label_ids), train.labels[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        with torch.no_grad():
            norms = update_row_norms(modules)
        norm_mean.append(norms.mean().item())
        norm_max.append(norms.max().item())
    # Training set included: its loss after training is free of the batch-to-batch noise of `losses`.
    metrics = {f"{split}_{k}": v for split in SPLITS for k, v in evaluate(model, st[split], label_ids).items()}
    # ALLoRA's scale c in the last backward, relative to its value eta at zero rows: how far it tapered.
    eta = METHOD_BY_NAME[job.method].adapter_spec().eta
    taper = {f"{k}_over_eta": v / eta for k, v in scale_diagnostics(model).items() if k in ("c_min", "c_mean")}
    return {**asdict(job), **metrics, **taper, "wall_s": time.perf_counter() - t0,
            "curves": {"loss": losses, "norm_mean": norm_mean, "norm_max": norm_max}}


def base_metrics() -> dict:
    """The pretrained base before any finetuning (step 0), on every split."""
    st = _STATE
    return {split: evaluate(st["base"], st[split], st["label_ids"]) for split in SPLITS}


# ---------------------------------------------------------------- the grid

def jobs_for(s: Settings) -> list[Job]:
    jobs = [Job(m.name, opt, lr, budget, steps, seed)
            for budget, steps in s.budgets for m in METHODS for opt in OPTIMIZERS
            for lr in s.lrs(opt) for seed in range(s.seeds)]
    # Control: the usual LoRA finetuned from random weights (is the pretrained knowledge used?).
    budget, steps = s.budgets[-1]
    jobs += [Job("lora", "adamw", s.fixed_lr("adamw"), budget, steps, seed, init="random") for seed in range(s.seeds)]
    return sorted(jobs, key=lambda j: -j.steps)  # longest first: better packing over the workers


def run_all(jobs: list[Job], base_dir: Path, s: Settings, workers: int, log=print) -> tuple[list[dict], dict]:
    t0, done, results = time.perf_counter(), 0, []

    def progress(r):
        nonlocal done
        done += 1
        results.append(r)
        if done % max(1, len(jobs) // 10) == 0 or done == len(jobs):
            el = time.perf_counter() - t0
            log(f"[replicate] {done}/{len(jobs)} runs, {el:.0f} s elapsed, ~{el / done * (len(jobs) - done):.0f} s left")

    if workers <= 1:
        init_worker(str(base_dir), s)
        step0 = base_metrics()
        for j in jobs:
            progress(finetune(j))
        return sorted(results, key=_job_order), step0
    # spawn, not fork: the parent has run torch's thread pools (pretraining), which fork can wedge.
    pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(str(base_dir), s))
    try:
        step0 = pool.apply(base_metrics)
        for r in pool.imap_unordered(finetune, jobs):
            progress(r)
    finally:
        pool.close()  # let the workers exit on their own (terminating them leaks their semaphores)
        pool.join()
    return sorted(results, key=_job_order), step0  # completion order varies; the JSON should not


def _job_order(r: dict) -> tuple:
    return ([m.name for m in METHODS].index(r["method"]), r["init"], r["optimizer"], r["budget"], r["lr"], r["seed"])


# ---------------------------------------------------------------- aggregation

def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.fmean(v) for v in zip(*curves)]


def summarise(results: list[dict], s: Settings) -> tuple[list[dict], dict]:
    """Per (method, optimizer, budget, lr): seed statistics and seed-mean curves; marks the selected LR."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["init"] == "pretrained":
            groups.setdefault((r["method"], r["optimizer"], r["budget"], r["lr"]), []).append(r)
    rows, curves = [], {}
    for (method, opt, budget, lr), rs in groups.items():
        rows.append({
            "method": method, "optimizer": opt, "budget": budget, "lr": lr, "seeds": len(rs),
            **{f"{split}_{k}_{stat}": v for split in SPLITS for k in ("acc", "loss")
               for stat, v in zip(("mean", "std"), mean_std([r[f"{split}_{k}"] for r in rs]))},
            "test_acc_seeds": [r["test_acc"] for r in sorted(rs, key=lambda r: r["seed"])],
            **{f"{k}_mean": statistics.fmean(r[k] for r in rs) for k in ("c_min_over_eta", "c_mean_over_eta") if k in rs[0]},
            "selected": False, "fixed_lr": lr == s.fixed_lr(opt),
        })
        curves[f"{method}|{opt}|{budget}|{lr:g}"] = {k: mean_curve([r["curves"][k] for r in rs])
                                                      for k in ("loss", "norm_mean", "norm_max")}
    for key in {(r["method"], r["optimizer"], r["budget"]) for r in rows}:
        cands = [r for r in rows if (r["method"], r["optimizer"], r["budget"]) == key]
        # Best mean validation accuracy; ties (accuracy moves in steps of 1/n_val) go to the lower loss.
        max(cands, key=lambda r: (r["val_acc_mean"], -r["val_loss_mean"]))["selected"] = True
    order = {m.name: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order[r["method"]], r["optimizer"], r["budget"], r["lr"]))
    return rows, curves


def selected(rows: list[dict], method: str, opt: str, budget: str, fixed: bool = False) -> dict:
    key = "fixed_lr" if fixed else "selected"
    return next(r for r in rows if (r["method"], r["optimizer"], r["budget"]) == (method, opt, budget) and r[key])


# ---------------------------------------------------------------- plots

def _color(method: str):
    import matplotlib.pyplot as plt

    family = {"lora": plt.cm.Blues, "allora": plt.cm.Reds}
    shade = {"lora": 0.95, "lora_nodrop": 0.75, "lora_x1.41": 0.55, "lora_x1": 0.4,
             "allora_eta2_4": 0.9, "allora_eta2_2": 0.65, "allora_eta2_1": 0.45}
    if method == "allora_od":
        return "tab:green"
    return family["allora" if method.startswith("allora") else "lora"](shade[method])


def _smooth(xs: list[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (batch losses of 16 examples are noisy)."""
    out, m = [], 0.0
    for i, x in enumerate(xs, 1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**i))
    return out


def _dynamics_panel(ax, curves: dict, opt: str, lr: float, budget: str, key: str, smooth: bool, ylabel: str) -> None:
    for m in METHODS:
        ys = curves[f"{m.name}|{opt}|{budget}|{lr:g}"][key]
        # Losses are per step (1..N); row norms start with step 0, where B = 0.
        xs = range(1, len(ys) + 1) if key == "loss" else range(len(ys))
        ax.plot(list(xs), _smooth(ys) if smooth else ys, color=_color(m.name), lw=1.6, label=m.label)
    ax.set_title(f"{opt}, lr {lr:g}, {budget} budget", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_dynamics(curves: dict, s: Settings, img: Path) -> list[Path]:
    """Training loss, and mean / max row norm of the effective update ``s B A`` per step, at the fixed LR
    (one LR for every method, so the curves differ by the method alone)."""
    import matplotlib.pyplot as plt

    budget = s.budgets[-1][0]
    panels = {
        "replicate_loss.png": [("loss", True, "training loss (EMA 0.8, seed mean)")],
        "replicate_row_norms.png": [("norm_mean", False, "mean over rows of ||(s·BA)_i||"),
                                    ("norm_max", False, "max over rows of ||(s·BA)_i||")],
    }
    paths = []
    for name, rows in panels.items():
        fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.8 * len(rows)), squeeze=False, constrained_layout=True)
        for (key, smooth, ylabel), ax_row in zip(rows, axes):
            for ax, opt in zip(ax_row, OPTIMIZERS):
                _dynamics_panel(ax, curves, opt, s.fixed_lr(opt), budget, key, smooth, ylabel)
        axes[0, 0].legend(fontsize=7)
        paths.append(img / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def plot_accuracy(rows: list[dict], s: Settings, step0_test: float, img: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, constrained_layout=True)
    width = 0.8 / len(s.budgets)
    for ax, opt in zip(axes, OPTIMIZERS):
        for b, (budget, steps) in enumerate(s.budgets):
            sel = [selected(rows, m.name, opt, budget) for m in METHODS]
            xs = [i + (b - (len(s.budgets) - 1) / 2) * width for i in range(len(METHODS))]
            ax.bar(xs, [r["test_acc_mean"] for r in sel], width, yerr=[r["test_acc_std"] for r in sel], capsize=2,
                   color=[_color(m.name) for m in METHODS], alpha=0.55 + 0.45 * b / max(1, len(s.budgets) - 1),
                   edgecolor="black", lw=0.5, label=f"{budget} ({steps} steps)")
            # The seeds themselves: outcomes are often bimodal (a seed learns the task or stays near chance).
            for x, r in zip(xs, sel):
                ax.plot([x] * len(r["test_acc_seeds"]), r["test_acc_seeds"], "o", ms=3.5, mfc="white", mec="black", mew=0.7)
        ax.axhline(1 / len(LABELS), color="grey", ls=":", lw=1, label="chance")
        ax.axhline(step0_test, color="black", ls="--", lw=1, label="base, step 0")
        ax.set_xticks(range(len(METHODS)), [m.label for m in METHODS], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{opt}: test accuracy at the selected LR (bars: mean ± std; dots: seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (held-out nouns)")
    axes[0].legend(fontsize=7, loc="lower left")
    path = img / "replicate_accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- tables and report

def _cell(r: dict, with_lr: bool) -> str:
    lr = f" ({r['lr']:g})" if with_lr else ""
    return f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f}{lr}"


def accuracy_table(rows: list[dict], s: Settings, fixed: bool, markdown: bool) -> str:
    cols = [(opt, b) for opt in OPTIMIZERS for b, _ in s.budgets]
    head = ["method"] + [f"{opt} {b} ({dict(s.budgets)[b]} st)" for opt, b in cols]
    body = [[m.label] + [_cell(selected(rows, m.name, opt, b, fixed), not fixed) for opt, b in cols] for m in METHODS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + body)


BEGIN, END = "<!-- replicate:begin -->", "<!-- replicate:end -->"


def report_block(res: dict, s: Settings, imgs: list[Path], docs: Path) -> str:
    m, b, info = res["machine"], s.base, res["base"]
    (few, few_steps), (more, more_steps) = s.budgets[0], s.budgets[-1]
    epochs = lambda steps: f"{steps * s.batch / s.n_train:g} epoch" + ("" if steps * s.batch == s.n_train else "s")  # noqa: E731
    ctrl, task = res["control"], res["task"]
    lines = [
        BEGIN,
        "<!-- generated by bench/replicate.py; edit outside the markers -->",
        f"**Command:** `{res['command']}` — {len(res['runs'])} finetuning runs, {res['wall_s'] / 60:.1f} min wall "
        f"in total ({res['base_wall_s']:.0f} s of it building the base; 0 when cached).",
        "",
        f"**Machine:** {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"Python {m['python']}; {m['workers']} worker process(es) × 1 thread. Load average at start/end "
        f"{m['loadavg_1m_start_end'][0]:.1f}/{m['loadavg_1m_start_end'][1]:.1f} (shared machine).",
        "",
        f"* **Base model:** Llama-3 architecture, hidden {b.hidden}, {b.layers} layers, {b.heads} heads / {b.kv_heads} KV heads, "
        f"vocabulary {b.vocab}, {info['parameters']:,} parameters; pretrained from scratch {b.steps} steps × {b.batch} "
        f"× {b.seq_len} tokens on a {info['corpus_tokens']:,}-token synthetic corpus ({b.corpus_lines:,} sentences, "
        f"{b.fact_fraction:.0%} category facts); "
        f"final LM loss {info['final_loss']:.3f}; fact recall {info['fact_recall']:.0%}.",
        f"* **Task:** {s.n_train} finetuning documents over {len(task['train_nouns'])} nouns; {s.n_val} validation and "
        f"{s.n_test} test documents over the other {len(task['heldout_nouns'])} nouns; {len(LABELS)} classes (chance "
        f"{1 / len(LABELS):.3f}). Example: `{task['example'][0]}` -> `{task['example'][1]}`. Base at step 0: "
        + ", ".join(f"{split} {res['step0'][split]['acc']:.3f}" for split in SPLITS) + ".",
        f"* **Finetuning:** r = {RANK} on q/k/v/o/gate/up/down of every layer; batch {s.batch}; "
        f"budgets: {few} = {few_steps} steps "
        f"({epochs(few_steps)}), {more} = {more_steps} steps ({epochs(more_steps)}); warmup "
        f"{s.warmup_fraction:.0%} then linear decay to 0; loss = cross-entropy over the 5 label words. AdamW (betas 0.9/0.999, "
        f"no weight decay), LR grid {list(s.lrs('adamw'))}; SGD (momentum 0.9), LR grid {list(s.lrs('sgd'))}; "
        f"{s.seeds} seed(s) per cell (adapter init and batch order; same seeds for every method).",
        "* **LR selection:** per (method, optimizer, budget), the grid LR with the best mean validation accuracy "
        "(ties: lower validation loss); the test accuracy of that LR is reported.",
        f"* **Control:** the usual LoRA finetuned the same way ({more} budget, AdamW, lr {s.fixed_lr('adamw'):g}) from random "
        f"weights: test {ctrl['test_acc_mean']:.3f} ± {ctrl['test_acc_std']:.3f}.",
        f"* **ALLoRA's taper:** mean (min) of c/eta over all rows in the last step, {more} budget, fixed LR: "
        + taper_summary(res["summary"], more) + ".",
        "",
        "**Test accuracy at the selected learning rate** (mean ± std over seeds; the selected LR in parentheses):",
        "",
        accuracy_table(res["summary"], s, fixed=False, markdown=True),
        "",
        f"**Test accuracy at one fixed learning rate** (AdamW {s.fixed_lr('adamw'):g}, SGD {s.fixed_lr('sgd'):g}):",
        "",
        accuracy_table(res["summary"], s, fixed=True, markdown=True),
        "",
        "**Distance to LoRA x1 (alpha = r)**: mean and max over every (learning rate, budget, seed) of the absolute "
        "difference between a method's test accuracy and LoRA x1's in the same cell and seed:",
        "",
        distance_table(res["runs"], REFERENCE),
        "",
    ]
    lines += [f"![{p.stem}]({os.path.relpath(p, docs)})" for p in imgs]
    return "\n".join(lines + ["", END])


REFERENCE = "lora_x1"  # ALLoRA's forward has no scale, like LoRA with alpha = r


def distance_table(runs: list[dict], reference: str) -> str:
    acc = {(r["method"], r["optimizer"], r["lr"], r["budget"], r["seed"]): r["test_acc"]
           for r in runs if r["init"] == "pretrained"}
    lines = ["| method | " + " | ".join(OPTIMIZERS) + " |", "|---|" + "---|" * len(OPTIMIZERS)]
    for m in METHODS:
        if m.name == reference:
            continue
        cells = []
        for opt in OPTIMIZERS:
            d = [abs(v - acc[(reference, *k[1:])]) for k, v in acc.items() if k[0] == m.name and k[1] == opt]
            cells.append(f"{statistics.fmean(d):.3f} (max {max(d):.3f})")
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def taper_summary(rows: list[dict], budget: str) -> str:
    parts = []
    for opt in OPTIMIZERS:
        cells = [f"{m.label} {r['c_mean_over_eta_mean']:.2f} ({r['c_min_over_eta_mean']:.2f})"
                 for m in METHODS if "c_mean_over_eta_mean" in (r := selected(rows, m.name, opt, budget, fixed=True))]
        parts.append(f"{opt}: " + ", ".join(cells))
    return "; ".join(parts)


def write_report(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (or create the file around it), keeping the rest."""
    if path.is_file() and BEGIN in (text := path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = "# Miniature replication of ALLoRA\n\n" + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------- main

def _round(x, digits: int = 5):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def run_replication(s: Settings, cache_dir: Path, workers: int, command: str) -> dict:
    """Build (or load) the base, run every finetune, and collect the results (rounded for the JSON)."""
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    base_dir = build_base(s.base, cache_dir)
    base_wall = time.perf_counter() - t0
    jobs = jobs_for(s)
    print(f"[replicate] base {base_dir.name}; {len(jobs)} finetuning runs on {workers} worker(s)", flush=True)
    results, step0 = run_all(jobs, base_dir, s, workers, log=lambda msg: print(msg, flush=True))
    rows, curves = summarise(results, s)
    task = make_task(s.n_train, s.n_val, s.n_test, seed=s.task_seed)
    ctrl_mean, ctrl_std = mean_std([r["test_acc"] for r in results if r["init"] == "random"])
    return _round({
        "command": command,
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "python": platform.python_version(), "workers": workers,
                    "loadavg_1m_start_end": [load_start, os.getloadavg()[0]]},
        "settings": asdict(s), "rank": RANK,
        "methods": {m.name: {"label": m.label, **m.spec} for m in METHODS},
        "base": json.loads((base_dir / "base_info.json").read_text()), "base_wall_s": base_wall,
        "step0": step0,
        "task": {"train_nouns": task.train_nouns, "heldout_nouns": task.heldout_nouns,
                 "example": [task.train[0][0], LABELS[task.train[0][1]]]},
        "control": {"init": "random", "method": "lora", "optimizer": "adamw",
                    "test_acc_mean": ctrl_mean, "test_acc_std": ctrl_std},
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
        "curves_seed_mean": curves,
        "wall_s": time.perf_counter() - t0,
    })


def publish(res: dict, s: Settings, docs: Path) -> list[Path]:
    """Plots and the generated block of results.md, from the (rounded) results alone."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    imgs = [plot_accuracy(res["summary"], s, res["step0"]["test"]["acc"], img),
            *plot_dynamics(res["curves_seed_mean"], s, img)]
    write_report(docs / "results.md", report_block(res, s, imgs, docs))
    return imgs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny base, 1 seed, 1 LR, a few steps: a smoke test")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/replicate[_quick].json)")
    ap.add_argument("--docs", type=Path, help="folder for results.md and img/ (default docs/; with --quick, beside --out)")
    ap.add_argument("--report-only", action="store_true",
                    help="redo the plots and results.md from the JSON at --out, without running anything")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "bench" / "cache", help="where the pretrained base is cached")
    ap.add_argument("--seeds", type=int, help="seeds per cell (default 5; 1 with --quick)")
    ap.add_argument("--workers", type=int,
                    help="finetuning processes (default: all cores; 1 with --quick, where starting them costs more than "
                         "it saves)")
    # One thread by default: on a shared machine, OpenMP threads competing for busy cores made
    # pretraining 5-7x slower than one thread.
    ap.add_argument("--threads", type=int, default=1, help="torch threads for pretraining the base (default 1)")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = replace(s, seeds=args.seeds) if args.seeds else s
    out = args.out or REPO / "bench" / "results" / ("replicate_quick.json" if args.quick else "replicate.json")
    docs = args.docs or (out.parent / f"{out.stem}_docs" if args.quick else REPO / "docs")

    if args.report_only:
        res = json.loads(out.read_text())
        if res["settings"] != _round(json.loads(json.dumps(asdict(s)))):
            ap.error(f"{out} comes from a run with other settings; pass the --quick/--seeds of that run")
    else:
        torch.set_num_threads(args.threads)
        quiet_transformers()
        workers = args.workers or (1 if args.quick else len(os.sched_getaffinity(0)))
        command = " ".join([".venv/bin/python", "bench/replicate.py", *(argv if argv is not None else sys.argv[1:])])
        res = run_replication(s, args.cache_dir, workers, command)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    imgs = publish(res, s, docs)
    print(f"[replicate] wrote {out}, {docs / 'results.md'}, {', '.join(p.name for p in imgs)} "
          f"({res['wall_s'] / 60:.1f} min of runs)")
    print(f"\nTest accuracy, selected LR (mean ± std over {s.seeds} seed(s)); "
          f"base at step 0: {res['step0']['test']['acc']:.3f}")
    print(accuracy_table(res["summary"], s, fixed=False, markdown=False))
    return res


if __name__ == "__main__":
    main()
