"""The project's own sbatch script on a real Slurm cluster brought up on this machine.

tests/cluster/local_slurm.sh starts slurmctld, munged and two slurmd "nodes", each in its own
network namespace with its own address and hostname. The tests submit
launch/slurm/llama3_8b_allora.sbatch, the file users get, parameterised only through sbatch's
own options and environment (CPU instead of GPUs, the tiny model instead of Llama-3-8B):

    sbatch --nodes=2 --gpus-per-node=0 --export=ALL,GPUS_PER_NODE=1,LOG_DIR=... \\
        launch/slurm/llama3_8b_allora.sbatch CONFIG train.output_dir=...

Needs root (daemons, namespaces) and Slurm's Debian packages (.ci/run installs them; the helper
installs them when missing). The cluster is torn down even when a test fails.
"""

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from tests.cluster.helpers import LOCAL_SLURM, STEPS, TIMEOUT, assert_same_training, final_checkpoint, is_root, \
    reference_run, tail
from tests.helpers import REPO, read_metrics, test_env, write_config

SBATCH = REPO / "launch" / "slurm" / "llama3_8b_allora.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.env = test_env(SLURM_CONF=base / "etc" / "slurm.conf")

    def cmd(self, *args, check=True) -> str:
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode:
            pytest.fail(f"{' '.join(map(str, args))} failed (rc={proc.returncode}): {proc.stderr}")
        return proc.stdout

    def submit(self, out: Path, *args, nodes: str = "2") -> str:
        """sbatch the project's script for ``nodes`` CPU "nodes" x 1 rank; returns the job id."""
        return self.cmd("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--time=20",
                        f"--output={out}/slurm-%j.out", f"--export=ALL,GPUS_PER_NODE=1,LOG_DIR={out}/logs",
                        SBATCH, *args).strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        line = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, until, what: str, out: Path, timeout: float = TIMEOUT) -> dict:
        """Poll the job (cheaper and faster than sbatch --wait) until ``until(job)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if job["JobState"] in DONE or time.monotonic() > deadline:
                self.cmd("scancel", job_id, check=False)
                pytest.fail(f"job {job_id} is {job['JobState']} (exit {job.get('ExitCode')}), waiting for {what}\n"
                            f"{self.logs(out)}")
            time.sleep(0.5)

    def release_requeued(self, job_id: str) -> None:
        """Start a requeued job now instead of after Slurm's ~2-minute hold. The hold exists because
        slurmd refuses a launch whose credential is not newer (in whole seconds) than the kill of the
        job's previous run: wait for the nodes to be idle (or drained), then a little more."""
        self.wait_idle()
        time.sleep(2)
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no node runs or winds down a job (and none is still coming up)."""
        deadline = time.monotonic() + timeout
        while not set(self.cmd("sinfo", "-h", "-o", "%T").split()) <= {"idle", "drained"} \
                and time.monotonic() < deadline:
            time.sleep(0.5)

    def logs(self, out: Path) -> str:
        files = sorted(out.glob("slurm-*.out")) + sorted((out / "logs").glob("node*.log")) + \
            sorted((self.base / "log").glob("*.log"))
        return "\n".join(f"--- {f} ---\n{tail(f, 2500)}" for f in files)


@pytest.fixture(scope="module")
def cluster():
    if not is_root():
        pytest.skip("needs root: starts slurmctld, slurmd, munged and network namespaces")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    # Under /tmp, not pytest's 0700 tmp dir: munged (user munge) must reach its socket there.
    base = Path(tempfile.mkdtemp(prefix="allora-slurm-", dir="/tmp"))
    try:
        mode = "multi" if os.environ.get("ALLORA_TEST_NETNS") == "0" else "netns"  # 0: exercise the fallback
        up = subprocess.run(["bash", LOCAL_SLURM, "up", base, "2", mode], capture_output=True, text=True, timeout=600)
        if up.returncode:
            pytest.fail(f"the local Slurm cluster did not come up (rc={up.returncode}):\n{up.stderr[-5000:]}")
        mode = (base / "mode").read_text().strip()
        if mode != "netns":
            msg = f"Slurm nodes share 127.0.0.1 (mode {mode}): network namespaces unavailable"
            print(msg)
            warnings.warn(msg)
        yield Cluster(base)
    finally:
        subprocess.run(["bash", LOCAL_SLURM, "down", base], capture_output=True, timeout=300)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.needs_root
def test_sbatch_script_trains_on_two_nodes_like_one_node(cluster, tiny_model, tmp_path_factory, tmp_path):
    cfg, ref = reference_run(tiny_model, tmp_path_factory)
    out = tmp_path / "run"
    job_id = cluster.submit(tmp_path, cfg, f"train.output_dir={out}")
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end of the job", tmp_path)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"job {job_id} ended {job['JobState']} {job['ExitCode']}\n{cluster.logs(tmp_path)}"
    # Both nodes took part: one launcher per node, each with its node rank, on its own host.
    assert job["NodeList"] == "node[1-2]", job["NodeList"]
    batch = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "2 node(s) x 1 rank(s), rendezvous node1:" in batch, batch
    for k, host in enumerate(("node1", "node2")):
        log = tmp_path / "logs" / f"node{k}-{host}.log"
        assert log.is_file(), f"no log from node {k}: {list((tmp_path / 'logs').iterdir())}"
        text = log.read_text()
        assert f"[{host}] node {k}:" in text and f"node_rank={k}" in text, f"{log}:\n{text[-2000:]}"
    assert {p.name for p in (final_checkpoint(out) / "rng").iterdir()} == {"rank-00000.pt", "rank-00001.pt"}
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert read_metrics(out, "eval"), "no eval metrics"
    assert_same_training(out, ref, "sbatch on 2 Slurm nodes")


def _trained_past(out: Path, step: int):
    def until(job):
        try:
            return any(r["step"] > step for r in read_metrics(out))
        except (OSError, ValueError):  # not written yet, or a line half-written
            return False
    return until


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.needs_root
def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tiny_model, tmp_path):
    """--signal=B:USR1@600 -> the script forwards USR1 to the ranks, which checkpoint and exit 0 ->
    the script requeues the job -> it resumes from that checkpoint. Then `scancel --signal=USR1`
    (steps only) stops it for good: the job completes with exit 0 and a newer checkpoint."""
    out = tmp_path / "run"
    # Far more steps than the test waits for: both stops land mid-run whatever the machine's speed.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, out,
                       train={"max_steps": 100000, "save_steps": 0, "log_steps": 1, "warmup_steps": 1})
    job_id = cluster.submit(tmp_path, cfg)
    trained_past = functools.partial(_trained_past, out)
    cluster.wait(job_id, trained_past(1), "training to start", tmp_path)
    cluster.cmd("scancel", "--batch", "--signal=USR1", job_id)  # what Slurm sends at the time limit
    cluster.wait(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", "the requeue", tmp_path, timeout=300)
    first = (out / "checkpoints" / "latest").read_text()
    k = int(first.removeprefix("step-"))
    batch = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "SIGUSR1 (time limit near)" in batch and f"requeueing job {job_id}" in batch, batch
    cluster.release_requeued(job_id)
    cluster.wait(job_id, trained_past(k), "the requeued job to train on", tmp_path)
    node0 = (tmp_path / "logs" / "node0-node1.log").read_text()
    assert f"resumed from {out / 'checkpoints' / first} at step {k}" in node0, node0[-3000:]

    cluster.cmd("scancel", "--signal=USR1", job_id)  # steps only: save and stop, no requeue
    job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end of the job", tmp_path, timeout=300)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), cluster.logs(tmp_path)
    last = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert k < last < 100000
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, last + 1)), f"steps not continuous across the requeue: {steps}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.needs_root
def test_a_requeue_onto_fewer_nodes_continues_the_run(cluster, tiny_model, tmp_path):
    """The job trains on both nodes. An admin drains node2 (as for a failing node); at the
    time-limit signal the job checkpoints and requeues, and waits for 2 nodes; shrunk to the one
    node left (``scontrol update JobId=... NumNodes=1``, then ``NumTasks=1``) it starts there and continues from that
    checkpoint on 1 rank instead of 2: at the same number of examples seen, every later step
    logged once."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model, out,
                       train={"max_steps": 100000, "save_steps": 0, "log_steps": 1, "warmup_steps": 1})
    job_id = cluster.submit(tmp_path, cfg)
    try:
        cluster.wait(job_id, _trained_past(out, 1), "training to start", tmp_path)
        assert cluster.job(job_id)["NodeList"] == "node[1-2]"
        cluster.cmd("scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=allora_ds test: failing node")
        cluster.cmd("scancel", "--batch", "--signal=USR1", job_id)
        cluster.wait(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", "the requeue", tmp_path,
                     timeout=300)
        first = (out / "checkpoints" / "latest").read_text()
        k = int(first.removeprefix("step-"))
        for change in ("NumNodes=1", "NumTasks=1"):  # what the one node left can run (one task per node)
            cluster.cmd("scontrol", "update", f"JobId={job_id}", change)
        cluster.release_requeued(job_id)
        node0 = tmp_path / "logs" / "node0-node1.log"
        resumed = re.compile(rf"resumed from {re.escape(str(out / 'checkpoints' / first))} at step (\d+)")

        def resumed_and_trained(job):
            m = resumed.search(node0.read_text())
            return m is not None and _trained_past(out, int(m.group(1)))(job)

        cluster.wait(job_id, resumed_and_trained, "the requeued job to resume on one node and train", tmp_path)
        assert cluster.job(job_id)["NodeList"] == "node1"
        cluster.cmd("scancel", "--signal=USR1", job_id)
        job = cluster.wait(job_id, lambda j: j["JobState"] in DONE, "the end of the job", tmp_path, timeout=300)
    finally:
        cluster.cmd("scontrol", "update", "NodeName=node2", "State=RESUME", check=False)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), cluster.logs(tmp_path)
    batch = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "(restart 1): 1 node(s) x 1 rank(s)" in batch, batch
    log = node0.read_text()
    j = int(resumed.search(log).group(1))
    epoch, into = divmod(k, 30)  # 480 examples: 30 steps of 16 sequences, 60 of 8
    assert j == 60 * epoch + 2 * into, f"{k} steps of 16 sequences are {60 * epoch + 2 * into} steps of 8, not {j}"
    assert f"global batch 16 -> 8 sequences: step {k} ({16 * into} examples into epoch {epoch}) continues as " \
           f"step {j}" in log, log[-3000:]
    assert "1 rank(s), 60 steps/epoch" in log, log[-3000:]
    last = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert {p.name for p in (out / "checkpoints" / f"step-{last:08d}" / "rng").iterdir()} == {"rank-00000.pt"}
    steps = [r["step"] for r in read_metrics(out)]
    assert j < last and steps == [*range(1, k + 1), *range(j + 1, last + 1)], f"steps across the requeue: {steps}"


def test_sbatch_scripts_share_one_tested_body():
    """Only the 8B script runs above; the 70B one must differ from it only in its header
    (#SBATCH lines, comments, default config) and run the same launch/slurm/job.sh, so that it is
    tested too."""
    source = 'source "$ALLORA_DIR/launch/slurm/job.sh"'
    scripts = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))
    assert {s.name for s in scripts} >= {"llama3_8b_allora.sbatch", "llama3_70b_allora.sbatch"}
    for s in scripts:
        head = s.read_text()
        assert head.rstrip().endswith(source), f"{s.name}: does not end with '{source}'"
        for line in ("#SBATCH --requeue", "#SBATCH --ntasks-per-node=1", "#SBATCH --open-mode=append"):
            assert line in head, f"{s.name}: missing {line}"
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", head, re.M), f"{s.name}: no --signal=B:USR1@SECONDS"
        default = re.search(r"^DEFAULT_CONFIG=(\S+)$", head, re.M)
        assert default and (REPO / default.group(1)).is_file(), f"{s.name}: DEFAULT_CONFIG missing or not a file"
    for s in [*scripts, REPO / "launch" / "slurm" / "job.sh"]:
        syntax = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{s.name}: {syntax.stderr}"
