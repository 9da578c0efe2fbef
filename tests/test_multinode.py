"""Both SLURM scripts (launch/slurm/*.sbatch), their real bodies, as two-node jobs on this machine.

The test plays sbatch/slurmctld: it copies the script to a spool folder (as slurmd does), gives it
the environment a two-node allocation gives a batch script (SLURM_JOB_ID, SLURM_JOB_NODELIST,
SLURM_JOB_NUM_NODES, SLURM_NNODES, SLURM_NODEID, SLURM_PROCID, ...) and runs it with the
stand-ins of tests/slurm_standins/ first on PATH: ``srun`` and ``scontrol``, and for the deepspeed
launcher's remote shell ``pdsh`` over ``ssh`` (a fresh login environment per node: only what the
launcher forwards reaches a node) and ``pkill`` (scoped to one node of this job). The two "nodes"
are ``localhost`` and ``127.0.0.1`` (both loopback everywhere), one CPU rank each
(DS_ACCELERATOR=cpu, a property of the node), each with its own TMPDIR; run.output_dir is shared
(as a cluster's shared filesystem would be).

Per script: a tiny stage 3 (2 steps, a checkpoint every step) whose rank 1 SIGKILLs itself inside
the step-2 save (DISTILL_FAULTS, deterministic); the job must end by itself (the failure reaches
the other node), then the same command resumes from step 1 and finishes with the per-step losses
of a single-node 2-rank run. And a node whose rank fails at start-up (node 1 sees a teacher path
that does not exist there: a node without the shared filesystem) must end the job, non-zero,
long before any rendezvous timeout, with that node's failure in the job's output.

What this cannot show (README, Multi-node): the fabric (NCCL over IB/RoCE, its env settings),
real ssh/pdsh/slurmd behaviour beyond what the stand-ins emulate, a filesystem shared by
different machines, GPUs.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from itertools import count
from pathlib import Path

import pytest

from _dist_fixtures import REPO, make_inputs, metrics as _metrics
import _launch

STANDINS = Path(__file__).resolve().parent / "slurm_standins"
sys.path.insert(0, str(STANDINS))
import _standin  # noqa: E402

HOSTS = ("localhost", "127.0.0.1")
SCRIPTS = {"srun": "multinode_srun.sbatch", "deepspeed": "multinode_deepspeed.sbatch"}
TERMS = ("loss", "lm", "kd", "attn")
STEPS = 2
JOB_TIMEOUT = 240  # s; a hang (a node waiting for a dead peer) would sit at the 30 min rendezvous timeout
_ids = count(1)


class Job:
    def __init__(self, rc, out, elapsed, job_id, leftovers):
        self.rc, self.out, self.elapsed, self.job_id, self.leftovers = rc, out, elapsed, job_id, leftovers

    def __repr__(self):
        left = "".join(f"\n  left running: {c}" for c in self.leftovers)
        return f"job {self.job_id}: rc={self.rc} after {self.elapsed:.0f}s{left}\n{self.out[-6000:]}"


def sbatch(script: str, args, work: Path, env=None, node_env=None, timeout=JOB_TIMEOUT) -> Job:
    """Run launch/slurm/<script> as a two-node job; returns when the batch script has ended and
    the job's remaining processes (on every node) are killed, as SLURM does at job end."""
    job_id = 4000 + (os.getpid() % 1000) * 10 + next(_ids)
    marker = f"{job_id}-{uuid.uuid4().hex}"  # what confines pkill and the job-end cleanup to this job
    job_dir = work / f"job{job_id}"
    job_dir.mkdir(parents=True)
    spool = job_dir / "slurm_script"  # slurmd runs a copy, not the submitted file
    shutil.copy(REPO / "launch" / "slurm" / script, spool)
    nodelist = ",".join(HOSTS)
    nodes = {str(i): {"DS_ACCELERATOR": "cpu", **(node_env or {}).get(i, {})} for i in range(len(HOSTS))}
    (job_dir / "job.json").write_text(json.dumps({
        "job_id": job_id, "marker": marker, "job_name": "distill", "nodelist": nodelist, "hosts": list(HOSTS),
        "command": str(REPO / "launch" / "slurm" / script), "workdir": str(work),
        "node_env": nodes, "kill_wait": 3}))
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STANDIN_"))}
    e.pop("DISTILL_HOME", None)  # the scripts find the checkout through scontrol
    e.update(env or {})
    e.update({
        "PATH": f"{STANDINS}:{e.get('PATH', '/usr/bin:/bin')}", "STANDIN_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(_launch.free_port()),
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "distill",
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(len(HOSTS)),
        "SLURM_NNODES": str(len(HOSTS)), "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
        "SLURM_NTASKS": str(len(HOSTS)), "SLURM_NPROCS": str(len(HOSTS)), "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": f"1(x{len(HOSTS)})", "SLURM_JOB_CPUS_PER_NODE": f"1(x{len(HOSTS)})",
        "SLURM_CPUS_ON_NODE": "1", "SLURM_GTIDS": "0", "SLURM_SUBMIT_DIR": str(work),
        "SLURM_SUBMIT_HOST": HOSTS[0], "SLURMD_NODENAME": HOSTS[0], "SLURM_TOPOLOGY_ADDR": HOSTS[0],
        "SLURM_CLUSTER_NAME": "emulated", "SLURM_JOB_PARTITION": "cpu",
        "STANDIN_JOB_DIR": str(job_dir), "STANDIN_JOB_ID": marker, "STANDIN_NODE": "0",
        "TMPDIR": str(job_dir / "node0" / "tmp"), **nodes["0"],
    })
    (job_dir / "node0" / "tmp").mkdir(parents=True)
    log = job_dir / f"distill-{job_id}.out"
    t0 = time.monotonic()
    with open(log, "wb") as f:
        p = subprocess.Popen(["bash", str(spool), *map(str, args)], cwd=str(work), env=e, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None  # hung: the job's time limit
    elapsed = time.monotonic() - t0
    time.sleep(1)
    leftovers = _end_job(marker)
    return Job(rc, log.read_text(errors="replace"), elapsed, job_id, leftovers)


def _end_job(marker) -> list[str]:
    """SLURM kills whatever of the job still runs, on every node; returns what it found."""
    found = []
    for _ in range(3):
        pids = _standin.job_pids(marker)
        if not pids:
            break
        for pid in pids:
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160])
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
    return found


def _stage3_args(paths, out, teacher=None):
    ov = list(paths["common"]) + [f"run.steps={STEPS}", "run.save_every=1", f"run.output_dir={out}"]
    if teacher is not None:
        ov.append(f"model.teacher={teacher}")
    return ["3", paths["yaml3"], *ov]


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    return root, make_inputs(root, tiny_models)


@pytest.fixture(scope="module")
def reference(inputs):
    """The same stage 3 as one node with 2 ranks."""
    root, paths = inputs
    out = root / "single_node"
    logs = out / "logs"
    logs.mkdir(parents=True)
    args = _stage3_args(paths, out)[1:]
    rc = _launch.run(REPO / "launch" / "stage3.py", ["--config", *args], 2, logs, timeout=600)
    assert rc == 0, (logs / "rank0.log").read_text()[-3000:] + (logs / "rank1.log").read_text()[-3000:]
    return _metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def killed_then_resumed(request, inputs):
    root, paths = inputs
    work = root / request.param
    out = work / "run"
    args = _stage3_args(paths, out)
    killed = sbatch(SCRIPTS[request.param], args, work, env={"DISTILL_FAULTS": "kill_in_save=2@1"})
    state = {"latest": (out / "checkpoints" / "latest").read_text() if (out / "checkpoints" / "latest").exists() else None,
             "tmp": sorted(p.name for p in (out / "checkpoints").glob("*.tmp")),
             "metrics": _metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else {}}
    resumed = sbatch(SCRIPTS[request.param], args, work)
    return request.param, out, killed, state, resumed


def test_kill_in_a_save_ends_the_whole_job(killed_then_resumed):
    """Rank 1 (node 1) SIGKILLs itself inside the step-2 save: the job ends by itself (node 0's
    rank does not wait at the save's barrier), step 1's checkpoint stays the latest."""
    variant, out, killed, state, _ = killed_then_resumed
    assert killed.rc not in (None, 0), killed
    assert state["latest"] == "step00000001", killed
    assert state["tmp"] == ["step00000002.tmp"], killed
    assert sorted(state["metrics"]) == [1, 2], killed  # step 2 was trained and logged before the kill
    assert not killed.leftovers, killed  # the script stopped every node itself (not SLURM's job-end cleanup)


def test_ranks_span_both_nodes_and_both_write_the_checkpoint(killed_then_resumed):
    variant, out, killed, _, resumed = killed_then_resumed
    assert resumed.rc == 0, resumed
    for job in (killed, resumed):
        # one launcher per node, each with its node rank, the world of both (deepspeed launch.py's log)
        for node in range(len(HOSTS)):
            assert f"nnodes={len(HOSTS)}, num_local_procs=1, node_rank={node}" in job.out, job
        assert job.out.count("dist_world_size=2") >= len(HOSTS), job
    import torch

    for step in (1, 2):
        ck = out / "checkpoints" / f"step{step:08d}"
        meta = json.loads((ck / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == step
        for r in range(2):
            st = torch.load(ck / f"train_state_rank{r}.pt", weights_only=False)
            assert st["world_size"] == 2 and st["step"] == step
    assert (out / "final").is_dir() and not list((out / "checkpoints").glob("*.tmp"))


def test_rerun_resumes_with_the_single_node_losses(killed_then_resumed, reference):
    variant, out, killed, state, resumed = killed_then_resumed
    assert resumed.rc == 0, resumed
    assert "resumed from" in resumed.out and "at step 1" in resumed.out, resumed
    assert sorted(state["metrics"]) == sorted(reference) == list(range(1, STEPS + 1))
    final = _metrics(out / "metrics.jsonl")
    for step in reference:
        for k in TERMS:
            for got in (state["metrics"][step][k], final[step][k]):  # before the kill and after the resume
                assert math.isclose(got, reference[step][k], rel_tol=1e-6, abs_tol=1e-9), (variant, step, k)


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def node_fails_at_start(request, inputs, tiny_models):
    """Node 1 sees ``$MN_TEACHER`` as a folder that does not exist there, node 0 sees the real
    one: node 1's rank fails its config check before the rendezvous, node 0's rank waits in it."""
    root, paths = inputs
    work = root / f"{request.param}_fail"
    args = _stage3_args(paths, work / "run", teacher="$MN_TEACHER")
    node_env = {0: {"MN_TEACHER": str(tiny_models.teacher)}, 1: {"MN_TEACHER": str(work / "not_mounted")}}
    return request.param, sbatch(SCRIPTS[request.param], args, work, node_env=node_env)


def test_a_node_failing_at_start_ends_the_job(node_fails_at_start):
    variant, job = node_fails_at_start
    assert job.rc is not None, f"hung: still running after {JOB_TIMEOUT}s\n{job}"
    assert job.rc != 0, job
    # node 1's launcher reports its rank's exit code 2 (a config error) ...
    if variant == "srun":
        assert "srun: error: 127.0.0.1: task 1: Exited with exit code 2" in job.out, job
        assert "exits with return code = 2" in job.out, job
    else:  # pdsh prefixes each node's lines with its host name
        assert any(line.startswith("127.0.0.1: ") and "exits with return code = 2" in line
                   for line in job.out.splitlines()), job
    assert not job.leftovers, job  # node 0's rank, waiting in the rendezvous, was stopped by the script


def test_the_failing_nodes_error_text_is_in_the_job_output(node_fails_at_start):
    variant, job = node_fails_at_start
    assert "does not exist" in job.out, job  # the ModelConfigError of node 1's rank
