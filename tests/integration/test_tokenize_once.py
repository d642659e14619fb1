"""One rank tokenizes for the job when the datasets cache is shared (else one per node), and the
others wait longer than the training group's collective timeout would allow (2 gloo processes)."""

import json
import os
import time

import pytest
import torch.multiprocessing as mp

pytestmark = [pytest.mark.multiprocess]

COLLECTIVE_TIMEOUT_S = 2  # the training group's; the tokenizing rank works longer than that
WORK_S = 4


def _worker(rank, port, caches, local_ranks, out):
    import datetime

    import torch.distributed as dist

    os.environ["HF_DATASETS_CACHE"] = caches[rank]
    import datasets

    datasets.config.HF_DATASETS_CACHE = caches[rank]
    from allora_ds.mixture import tokenizing_rank_first

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    with tokenizing_rank_first(timeout_minutes=1.0, local_rank=local_ranks[rank]):
        start = time.time()
        if rank == 0:
            time.sleep(WORK_S)  # tokenizing
        end = time.time()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"start": start, "end": end}, f)
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path, caches, local_ranks):
    from allora_ds.distributed import free_port

    mp.spawn(_worker, args=(free_port(), caches, local_ranks, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_shared_cache_one_rank_tokenizes_and_the_other_waits_past_the_collective_timeout(tmp_path):
    cache = str(tmp_path / "cache")
    r0, r1 = _run(tmp_path, [cache, cache], local_ranks=[0, 0])  # two "nodes", one shared cache
    assert r1["start"] >= r0["end"], "rank 1 read the cache only after rank 0 had filled it"
    assert r1["start"] - r0["start"] >= WORK_S > COLLECTIVE_TIMEOUT_S
    assert not list((tmp_path / "cache").glob(".allora_ds-probe-*")), "the probe file is removed"


def test_node_local_caches_each_node_tokenizes(tmp_path):
    r0, r1 = _run(tmp_path, [str(tmp_path / "a"), str(tmp_path / "b")], local_ranks=[0, 0])
    assert r1["start"] < r0["end"], "a node that cannot see rank 0's cache tokenizes at once, without waiting"
