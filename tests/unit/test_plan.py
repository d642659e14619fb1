"""allora-plan: its byte predictions against bench/comm.py's counted bytes, its memory against
bench/memory.py, its recommendations against the shipped defaults, and its command line."""

import functools
import json
from pathlib import Path

import pytest
import yaml

from allora_ds.plan import Cluster, Workload, main, model_states, plan, sequence_parallel_sizes
from allora_ds.zero_comm import SHAPES, TARGETS, Shape, micro_batch_events, step_bytes, ulysses_bytes

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def _bench_shape(d: dict) -> Shape:
    return Shape(d["hidden"], d["intermediate"], d["layers"], d["heads"], d["kv_heads"], d["hidden"] // d["heads"],
                 d["vocab"])


@pytest.mark.parametrize("layout", [r["layout"] + f"@{r['world']}" for r in
                                    json.loads((RESULTS / "comm.json").read_text())["layouts"]])
def test_bytes_match_the_counted_bytes_of_bench_comm(layout):
    """Every collective's bytes per step, as counted on 2 and 4 CPU ranks, within 5% (they are exact)."""
    res = json.loads((RESULTS / "comm.json").read_text())
    row = next(r for r in res["layouts"] if f"{r['layout']}@{r['world']}" == layout)
    pred = step_bytes(_bench_shape(res["shape"]), res["shape"]["rank"], {"zero_optimization": row["zero_optimization"],
                      "communication_data_type": "fp32"}, row["world"], res["gradient_accumulation_steps"],
                      row["checkpointing"])
    measured = {k: v["measured"] for k, v in row["bytes"].items()}
    assert set(pred) == set(measured), f"{layout}: collectives {sorted(pred)} predicted, {sorted(measured)} counted"
    for k, m in measured.items():
        assert abs(pred[k] - m) <= 0.05 * m, f"{layout} {k}: predicted {pred[k]:,} bytes, counted {m:,}"


def test_checkpointing_gathers_the_base_a_third_time_and_hpz_keeps_it_in_the_node():
    """At Llama-3-8B scale over 16 GPUs: ZeRO-3 gathers ~1.75x the frozen base per micro-batch, ~2.5x
    with checkpointing (forward, recomputation, backward; the first layer's q/k/v need no backward
    without it); hpZ moves all but the persistent parameters inside the node (the LM head too: the
    chunked loss gathers it from the secondary copy, as the coordinator gathers layers)."""
    s, world = SHAPES["llama3-8b"], 16
    ds = _ds("zero3_bf16", s, Cluster(2, 8))
    base = 2 * s.frozen_numel()
    plain = step_bytes(s, 16, ds, world, 1, False)["all_gather@16"] / base
    ckpt = step_bytes(s, 16, ds, world, 1, True)["all_gather@16"] / base
    assert 1.6 < plain < 1.9 and 2.4 < ckpt < 2.6, (plain, ckpt)
    hpz = step_bytes(s, 16, _ds("zero3_hpz_bf16", s, Cluster(2, 8)), world, 1, True)
    persistent = 2 * (s.adapter_numel(16) + (2 * s.layers + 1) * s.hidden)
    assert hpz["all_gather@16"] == pytest.approx(persistent, rel=1e-3)
    assert hpz["all_gather@8"] > 2 * s.frozen_numel()


def _ds(name, s, c, rank=16):
    from allora_ds.plan import filled_config

    return filled_config({"zero3_bf16": "zero3", "zero3_hpz_bf16": "zero3_hpz", "zero2_bf16": "zero2"}[name], s, c,
                         Workload(2048, 1, rank=rank))


def test_events_without_checkpointing_skip_the_first_layers_qkv_backward():
    ev = micro_batch_events(SHAPES["llama3-8b"], checkpointing=False)
    fetched_bwd = {e.module for e in ev if e.kind == "fetch" and not e.forward}
    assert "model.layers.0.self_attn.q_proj.base_layer" not in fetched_bwd
    assert "model.layers.1.self_attn.q_proj.base_layer" in fetched_bwd
    assert "model.embed_tokens" not in fetched_bwd


@pytest.mark.parametrize("world", [1, 2])
def test_model_states_match_bench_memory(world):
    """bench/results/memory.json (Llama-3.2-1B shape, r 16, ZeRO-3 bf16) was measured with the
    persistence threshold of its time, 10 h: the planner's model states match the bytes the ranks
    hold (to 0.1%) and their resident memory after a step (within 15%)."""
    res = json.loads((RESULTS / "memory.json").read_text())
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * 2048}}
    pred = model_states(SHAPES["llama3.2-1b"], ds, world, res["adapter"]["rank"])
    rank0 = res["per_rank"][str(world)][0]
    acc = rank0["accounted"]
    assert pred["base"] == pytest.approx(acc["base_params"], rel=1e-3)
    assert pred["adapters"] == pytest.approx(acc["adapter_params"], rel=0.03)
    assert pred["optimizer"] == pytest.approx(acc["optimizer"], rel=1e-3)
    assert sum(pred.values()) == pytest.approx(rank0["rss_after_step"], rel=0.15)


@functools.lru_cache(maxsize=None)  # the 70B replays take seconds: each case once
def _recommended(model, nodes, rank=16, seq=2048, micro=1):
    return plan(SHAPES[model], Cluster(nodes, 8, 80.0), Workload(seq, micro, rank=rank))["recommended"]


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_8b_replicates_the_base(nodes):
    best = _recommended("llama3-8b", nodes)
    assert (best["layout"], best["checkpointing"]) == ("zero2", False), best["what"]


@pytest.mark.parametrize("nodes, layout", [(1, "zero3"), (2, "zero3_hpz"), (4, "zero3_hpz")])
def test_70b_partitions_within_a_node_across_nodes(nodes, layout):
    best = _recommended("llama3-70b", nodes, rank=32)
    assert (best["layout"], best["checkpointing"]) == (layout, True), best["what"]


@pytest.mark.parametrize("config, model, nodes", [
    ("llama3_8b_allora.yaml", "llama3-8b", 2),  # the sbatch default: 2 nodes x 8
    ("llama3_70b_allora.yaml", "llama3-70b", 2),
    ("llama3_8b_commonsense_r16.yaml", "llama3-8b", 1),  # one node of 8
    ("llama3_8b_commonsense_r32.yaml", "llama3-8b", 1),
])
def test_shipped_configs_use_what_the_planner_recommends(config, model, nodes):
    cfg = yaml.safe_load((REPO / "configs" / config).read_text())
    best = _recommended(model, nodes, cfg["adapter"]["rank"], cfg["data"]["max_seq_len"], cfg["train"]["micro_batch_size"])
    assert cfg["train"]["deepspeed"] == best["ds_config"], f"{config}: the planner recommends {best['ds_config']}"
    assert cfg["model"]["gradient_checkpointing"] == best["checkpointing"], config


def test_cli_prints_table_and_recommendation(capsys):
    main(["--model", "llama3.2-1b", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem", "24", "--seq-len", "1024",
          "--micro-batch", "2"])
    out = capsys.readouterr().out
    assert "Recommended:" in out and "allora-train CONFIG.yaml train.deepspeed=" in out
    assert "hpZ" not in out  # one node: nothing to keep inside it


def test_cli_reads_only_config_json_of_a_model_directory(tmp_path, capsys):
    from allora_ds.tiny import tiny_llama_config

    tiny_llama_config(512, hidden=64, layers=2).save_pretrained(tmp_path)  # config.json, no weights
    main(["--model", str(tmp_path), "--nodes", "2", "--gpus-per-node", "2", "--seq-len", "64", "--micro-batch", "1",
          "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["shape"]["hidden"] == 64 and res["shape"]["layers"] == 2
    assert {r["layout"] for r in res["candidates"]} == {"zero2", "zero3", "zero3_hpz", "zero3_offload"}
    assert res["recommended"]["fits"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama3-9b", "--nodes", "1", "--gpus-per-node", "8", "--seq-len", "2048", "--micro-batch", "1"],
     "--model: 'llama3-9b' is neither one of llama3-8b"),
    (["--model", "llama3-8b", "--nodes", "0", "--gpus-per-node", "8", "--seq-len", "2048", "--micro-batch", "1"],
     "--nodes must be a positive integer, got 0"),
    (["--model", "llama3-8b", "--nodes", "2", "--gpus-per-node", "8", "--micro-batch", "1"],
     "the following arguments are required: --seq-len"),
    (["--model", "llama3-8b", "--nodes", "two", "--gpus-per-node", "8", "--seq-len", "1", "--micro-batch", "1"],
     "argument --nodes: invalid int value: 'two'"),
    (["--model", "llama3-8b", "--nodes", "1", "--gpus-per-node", "8", "--seq-len", "1", "--micro-batch", "1",
      "--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
    (["--model", "llama3-8b", "--nodes", "1", "--gpus-per-node", "8", "--seq-len", "1", "--micro-batch", "1",
      "--sequence-parallel", "3"], "--sequence-parallel 3: use auto or one of 1, 2, 4, 8"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_sequence_parallel_splits_activations_and_adds_its_all_to_alls():
    s, c = SHAPES["llama3-8b"], Cluster(1, 8, 80.0)
    one = plan(s, c, Workload(131072, 1))
    four = plan(s, c, Workload(131072, 1, sequence_parallel=4))
    pick = lambda res: next(r for r in res["candidates"] if r["layout"] == "zero3" and r["checkpointing"])  # noqa: E731
    a, b = pick(one), pick(four)
    # a quarter of each sequence, plus o_proj's input, a storage of its own after Ulysses' all-to-all
    ulysses = 2 * s.heads * s.head_dim * 131072 // 4
    assert b["memory_gb"]["activations_no_ckpt"] * 1e9 == pytest.approx(a["memory_gb"]["activations_no_ckpt"] * 1e9 / 4
                                                                        + s.layers * ulysses)
    assert b["memory_gb"]["activations_ckpt"] * 1e9 == pytest.approx(a["memory_gb"]["activations_ckpt"] * 1e9 / 4 + ulysses)
    assert a["traffic"]["sp_gb"] == 0 and b["traffic"]["sp_gb"] > 0 and b["sp_comm_s"] > 0
    assert b["compute_s"] < a["compute_s"] / 3.5  # a quarter of each sequence's work, on a quarter of the rows
    assert four["overrides"][-1] == "train.sequence_parallel_size=4"


@pytest.mark.parametrize("seq_len, expected", [(32768, 1), (131072, 2), (524288, 8)])
def test_auto_proposes_sequence_parallelism_when_a_sequence_does_not_fit_with_margin(seq_len, expected):
    """32k: SP=1 (34 GB). 128k: SP=1 fits at 79 of 80 GB, no margin: SP=2. 512k: nothing fits at
    SP 1 or 2, SP=4 only at 80 GB: SP=8."""
    s, c = SHAPES["llama3-8b"], Cluster(1, 8, 80.0)
    res = plan(s, c, Workload(seq_len, 1), auto_sequence_parallel=True)
    assert res["workload"]["sequence_parallel"] == expected
    assert res["recommended"]["total_gb"] <= 0.9 * 80
    for n in [n for n in sequence_parallel_sizes(s, c) if n < expected]:
        best = plan(s, c, Workload(seq_len, 1, sequence_parallel=n))["recommended"]
        assert best is None or best["total_gb"] > 0.9 * 80


@pytest.mark.parametrize("method, targets", [("allora", TARGETS), ("lora", TARGETS), ("allora", ("q_proj", "v_proj")),
                                             ("allora", ("o_proj", "down_proj")), ("allora", ("gate_proj",))])
def test_activation_bytes_per_layer_are_what_autograd_saves_in_a_real_decoder_layer(method, targets):
    """A bf16 Llama decoder layer with the trainer's adapters, sdpa without a mask (GQA 2:1): every
    distinct storage its forward saves for backward (saved_tensors_hooks; parameters and the
    rotary tables, shared by all layers, left out) adds up to the planner's bytes per token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from allora_ds.adapters import AdapterSpec, inject_adapters
    from allora_ds.plan import activation_bytes_per_token_layer

    shape, tokens, rank = Shape(128, 352, 1, 8, 4, 16, 256), 96, 8
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                         num_hidden_layers=1, num_attention_heads=shape.heads,
                                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                                         attn_implementation="sdpa")).to(torch.bfloat16).requires_grad_(False)
    inject_adapters(model, AdapterSpec(method=method, rank=rank, target_modules=list(targets)), verbose=False)
    model.to(torch.bfloat16)
    x = torch.randn(1, tokens, shape.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {cos.untyped_storage().data_ptr(),
                                                                           sin.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    w = Workload(tokens, 1, rank=rank, targets=targets)
    assert sum(saved.values()) == activation_bytes_per_token_layer(shape, w) * tokens, sorted(saved.values())


def test_sequence_parallel_sizes_tile_nodes_and_split_heads():
    assert sequence_parallel_sizes(SHAPES["llama3-8b"], Cluster(2, 8)) == [1, 2, 4, 8, 16]  # 32 heads, 8 KV heads
    assert sequence_parallel_sizes(Shape(64, 224, 2, 4, 2, 16, 512), Cluster(1, 6)) == [1, 2]


def test_ulysses_bytes_by_hand():
    """Tiny shape (4 heads of 16, 2 KV heads), 10 tokens per rank, SP=2, 2 layers, bf16: per forward
    q + out = 2 x 10 x 64 x 2 B and k + v = 2 x 10 x 32 x 2 B; backward the same except that the
    first layer's k has no adapter to reach; checkpointing adds a forward."""
    s = Shape(64, 224, 2, 4, 2, 16, 512)
    fwd = 2 * 10 * 64 * 2 + 2 * 10 * 32 * 2
    got = ulysses_bytes(s, 10, 2, gas=3, checkpointing=False, targets=("q_proj", "v_proj"))
    assert got == {"all_to_all@2": 3 * (fwd + (fwd - 10 * 32 * 2) + 2 * fwd), "all_gather@2": 3 * 2 * 10 * 2 * 8}
    ckpt = ulysses_bytes(s, 10, 2, gas=1, checkpointing=True)
    assert ckpt["all_to_all@2"] == 2 * 3 * fwd and ckpt["all_gather@2"] == 2 * 2 * 10 * 2 * 8
    assert ulysses_bytes(s, 10, 4, gas=1, checkpointing=False)["all_to_all@4"] == 2 * 2 * (2 * 10 * 64 * 2 + 2 * 10 * 64 * 2)
    assert ulysses_bytes(s, 10, 1, gas=1, checkpointing=False) == {}


def test_long_sequence_config_uses_what_the_planner_recommends_at_its_sequence_parallel_size():
    cfg = yaml.safe_load((REPO / "configs" / "llama3_8b_long.yaml").read_text())
    t = cfg["train"]
    w = Workload(cfg["data"]["max_seq_len"], t["micro_batch_size"], t["gradient_accumulation_steps"],
                 cfg["adapter"]["rank"], sequence_parallel=t["sequence_parallel_size"])
    best = plan(SHAPES["llama3-8b"], Cluster(1, 8, 80.0), w)["recommended"]
    assert (t["deepspeed"], cfg["model"]["gradient_checkpointing"]) == (best["ds_config"], best["checkpointing"])
    assert best["total_gb"] < 0.5 * 80  # the margin SP=1 (~79 of 80 GB) does not leave


def test_mlp_tiles_shrink_the_layer_being_recomputed_and_cost_an_mlp_forward():
    s, c = SHAPES["llama3-8b"], Cluster(1, 8, 80.0)
    pick = lambda w: next(r for r in plan(s, c, w)["candidates"] if r["layout"] == "zero2" and r["checkpointing"])  # noqa: E731
    a, b = pick(Workload(131072, 1, sequence_parallel=4)), pick(Workload(131072, 1, sequence_parallel=4, mlp_tiles=8))
    tokens, mlp = 131072 // 4, 2 * 4 * s.intermediate  # gate, up, act, product in bf16, per token
    assert (a["memory_gb"]["activations_ckpt"] - b["memory_gb"]["activations_ckpt"]) * 1e9 == pytest.approx(
        tokens * mlp * (1 - 1 / 8))
    assert b["compute_s"] > a["compute_s"]
    assert plan(s, c, Workload(131072, 1, sequence_parallel=4, mlp_tiles=8))["overrides"][-1] == "model.mlp_tiles=8"


def test_activation_offload_moves_the_layer_inputs_to_host_memory_and_over_pcie():
    """128k tokens of 8B on one GPU each (SP=1): 32 layer inputs of 1 GiB; offload keeps 3 on the
    GPU (the newest, two in flight) and 31 per GPU in host memory, copied out and back every step."""
    s, c = SHAPES["llama3-8b"], Cluster(1, 8, 80.0)
    w, wo = Workload(131072, 1, grad_accum=2), Workload(131072, 1, grad_accum=2, activation_offload=True)
    pick = lambda w, ckpt: next(r for r in plan(s, c, w)["candidates"]  # noqa: E731
                                if r["layout"] == "zero2" and r["checkpointing"] == ckpt)
    layer_input = 2 * s.hidden * 131072
    a, b = pick(w, True), pick(wo, True)
    assert (a["total_gb"] - b["total_gb"]) * 1e9 == pytest.approx((s.layers - 3) * layer_input)
    assert a["total_gb"] > 0.9 * 80 and b["total_gb"] < 0.6 * 80
    assert b["host_gb"] * 1e9 == pytest.approx((s.layers - 1) * layer_input * 8)
    assert (b["traffic"]["pcie_gb"] - a["traffic"].get("pcie_gb", 0)) * 1e9 == pytest.approx(2 * 31 * layer_input * 2)
    assert pick(wo, False)["host_gb"] == 0 and pick(wo, False)["total_gb"] == pick(w, False)["total_gb"]
    assert plan(s, c, wo)["overrides"][-1] == "model.activation_offload=true"
    small_host = plan(s, Cluster(1, 8, 80.0, host_mem_gb=200.0), wo)  # 266 GB of inputs do not fit in 200
    assert not any(r["fits"] for r in small_host["candidates"] if r["checkpointing"] and r["host_gb"] > 200)
    assert "model.activation_offload=true" not in (plan(s, c, Workload(2048, 1, activation_offload=True))["overrides"])
