"""Stand-ins for ``srun``, ``scontrol``, ``pdsh``, ``ssh`` and ``pkill`` that run an emulated
multi-node SLURM job on one machine (used by tests/test_multinode.py; stdlib only).

The job is described by ``$STANDIN_JOB_DIR/job.json`` (written by the test, which plays sbatch
and slurmctld)::

    {"job_id": 4242, "marker": "4242-<uuid>", "nodelist": "localhost,127.0.0.1", "hosts": ["localhost", "127.0.0.1"],
     "command": "/abs/launch/slurm/x.sbatch", "workdir": "/submit/dir", "job_name": "distill",
     "node_env": {"0": {...}, "1": {...}}, "kill_wait": 3}

"Node" ``i`` is hosts[i]; every process of the job carries ``STANDIN_JOB_ID`` (the unique marker)
and ``STANDIN_NODE``
in its environment (the emulation's stand-in for the job's cgroup on each node), which is how
``pkill`` stays inside one node of this job and how the test cleans up at job end.

What each emulates (only what the launch scripts and the deepspeed launcher use):

``srun``     one task per node (or ``-n`` tasks block-distributed), the caller's environment
             (``--export=ALL[,K=V...]``) plus the step's ``SLURM_*`` variables, each node's tasks
             in their own session with a node-local ``TMPDIR``; ``--kill-on-bad-exit``: the first
             task to exit non-zero ends the step (SIGTERM to every task, SIGKILL after
             ``kill_wait`` s), as slurmd does; without it the other tasks run on.
``scontrol`` ``show hostnames [LIST]`` (hostlist expressions) and ``show job [ID]``.
``ssh``      ``ssh [opts] HOST CMD...`` runs ``CMD`` with ``bash -c`` in a fresh login
             environment of that node (HOME, USER, PATH, node-local TMPDIR; nothing of the
             caller's environment), in its own session, output relayed through pipes; killing
             the client leaves the remote command running (no tty), like OpenSSH.
``pdsh``     ``-w HOSTS`` over ``ssh`` (``PDSH_RCMD_TYPE``/``-R``), ``%h %u %n %%`` substitution,
             ``host: `` prefixed output, ``-S`` (largest remote exit status), ``-f``, ``-b``,
             ``-N``, ``-l``, ``-t``; SIGTERM ends pdsh without touching the remote commands.
``pkill``    ``pkill [-SIG] [-f] PATTERN`` over this node's processes of this job only.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

JOB_DIR = os.environ.get("STANDIN_JOB_DIR", "")


def _job() -> dict:
    if not JOB_DIR:
        sys.exit(f"{_tool()}: no STANDIN_JOB_DIR (this stand-in only runs inside an emulated job)")
    with open(os.path.join(JOB_DIR, "job.json")) as f:
        return json.load(f)


def _tool() -> str:
    return os.environ.get("STANDIN_TOOL", "standin")


def expand_hostlist(spec: str) -> list[str]:
    """``a,b[01-03,7]-x,c`` -> [a, b01-x, b02-x, b03-x, b7-x, c] (SLURM hostlist syntax)."""
    out = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            out.append(item)
            continue
        pre, ranges, suf = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                out += [f"{pre}{i:0{len(lo)}d}{suf}" for i in range(int(lo), int(hi) + 1)]
            else:
                out.append(f"{pre}{lo}{suf}")
    return out


def _node_env(job: dict, node: int) -> dict:
    """The plumbing every process of node ``node`` carries, the node's local TMPDIR, and the
    node's own settings (``node_env``: what differs between machines, e.g. DS_ACCELERATOR=cpu)."""
    tmp = os.path.join(JOB_DIR, f"node{node}", "tmp")
    os.makedirs(tmp, exist_ok=True)
    env = {"STANDIN_JOB_DIR": JOB_DIR, "STANDIN_JOB_ID": job["marker"], "STANDIN_NODE": str(node),
           "STANDIN_PYTHON": os.environ.get("STANDIN_PYTHON", sys.executable), "TMPDIR": tmp}
    env.update(job.get("node_env", {}).get(str(node), {}))
    return env


def _killpg(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- scontrol --------------------------------------------------------------------------------

def scontrol(argv: list[str]) -> int:
    job = _job()
    words = [a for a in argv if not a.startswith("-")]
    if words[:2] in (["show", "hostnames"], ["show", "hostname"]):
        spec = words[2] if len(words) > 2 else os.environ.get("SLURM_JOB_NODELIST", job["nodelist"])
        sys.stdout.write("".join(h + "\n" for h in expand_hostlist(spec)))  # one write, like scontrol
        return 0
    if words[:2] == ["show", "job"]:
        jid = words[2] if len(words) > 2 else str(job["job_id"])
        if jid != str(job["job_id"]):
            print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
            return 1
        hosts = job["hosts"]
        print(f"JobId={job['job_id']} JobName={job.get('job_name', 'distill')}\n"
              f"   UserId={os.environ.get('USER', 'user')}(0) GroupId=user(0)\n"
              f"   JobState=RUNNING Reason=None Dependency=(null)\n"
              f"   NodeList={job['nodelist']} BatchHost={hosts[0]}\n"
              f"   NumNodes={len(hosts)} NumCPUs={len(hosts)} NumTasks={len(hosts)} CPUs/Task=1\n"
              f"   Command={job['command']}\n"
              f"   WorkDir={job['workdir']}\n"
              f"   StdOut={job['workdir']}/{job.get('job_name', 'distill')}-{job['job_id']}.out")
        return 0
    print(f"scontrol (stand-in): unsupported: {' '.join(argv)}", file=sys.stderr)
    return 2


# ---- srun ------------------------------------------------------------------------------------

_SRUN_VALUE = {"-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks",
               "--ntasks-per-node": "ntasks_per_node", "--export": "export", "-w": "nodelist",
               "--nodelist": "nodelist", "--gpus-per-node": None, "--comment": None, "-J": None,
               "--job-name": None, "--cpu-bind": None, "--mpi": None, "-c": None, "--cpus-per-task": None}
_SRUN_FLAG = {"--kill-on-bad-exit": "kill", "-K": "kill", "-l": "label", "--label": "label",
              "--unbuffered": None, "-u": None, "--exclusive": None, "--overlap": None}


def _parse_srun(argv):
    opt = {"kill": False, "label": False, "export": "ALL"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        name, eq, val = a.partition("=")
        if name in _SRUN_FLAG:
            if _SRUN_FLAG[name]:
                opt[_SRUN_FLAG[name]] = (val != "0") if eq else True
        elif name in _SRUN_VALUE:
            if not eq:
                i += 1
                val = argv[i]
            if _SRUN_VALUE[name]:
                opt[_SRUN_VALUE[name]] = val
        else:
            sys.exit(f"srun (stand-in): unsupported option {a}")
        i += 1
    if i == len(argv):
        sys.exit("srun (stand-in): no command")
    return opt, argv[i:]


def srun(argv: list[str]) -> int:
    job = _job()
    opt, cmd = _parse_srun(argv)
    hosts = expand_hostlist(opt["nodelist"]) if "nodelist" in opt else job["hosts"]
    nodes = int(opt.get("nodes", len(hosts)))
    if nodes > len(job["hosts"]) or any(h not in job["hosts"] for h in hosts):
        print(f"srun: error: Unable to create step for job {job['job_id']}: Requested node configuration "
              "is not available", file=sys.stderr)
        return 1
    hosts = hosts[:nodes]
    ntasks = int(opt["ntasks"]) if "ntasks" in opt else nodes * int(opt.get("ntasks_per_node", 1))
    per_node = -(-ntasks // nodes)
    layout = [(t, t // per_node, t % per_node) for t in range(ntasks)]  # (procid, node idx, localid)
    step_file = os.path.join(JOB_DIR, "steps")
    with open(step_file, "a+") as f:
        f.seek(0)
        step = len(f.read().splitlines())
        f.write(f"{step}\n")
    base = dict(os.environ)
    if opt["export"] != "ALL":
        head, *extra = opt["export"].split(",")
        if head != "ALL":
            sys.exit("srun (stand-in): only --export=ALL[,NAME=VALUE...] is emulated")
        base.update(kv.split("=", 1) for kv in extra)
    nodelist_step = ",".join(hosts)
    tasks_per_node = [sum(1 for _, n, _ in layout if n == i) for i in range(nodes)]
    procs = []
    for procid, n, localid in layout:
        node = job["hosts"].index(hosts[n])
        env = dict(base)
        env.update({
            "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step), "SLURM_NODEID": str(node),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": str(ntasks),
            "SLURM_NPROCS": str(ntasks), "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NODELIST": nodelist_step,
            "SLURM_NODELIST": job["nodelist"], "SLURM_STEP_TASKS_PER_NODE": ",".join(map(str, tasks_per_node)),
            "SLURM_TASKS_PER_NODE": ",".join(map(str, tasks_per_node)), "SLURMD_NODENAME": hosts[n],
            "SLURM_TOPOLOGY_ADDR": hosts[n], "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
            "SLURM_SRUN_COMM_HOST": "127.0.0.1", "SLURM_CPUS_ON_NODE": "1",
        })
        env.update(_node_env(job, node))
        p = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=os.getcwd())
        procs.append((procid, hosts[n], p))

    def end_step(sig=signal.SIGTERM):
        for _, _, p in procs:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGCONT)
                _killpg(p.pid, sig)
        deadline = time.monotonic() + float(job.get("kill_wait", 30))
        while time.monotonic() < deadline and any(p.poll() is None for _, _, p in procs):
            time.sleep(0.1)
        for _, _, p in procs:
            _killpg(p.pid, signal.SIGKILL)  # the whole task, children included
            p.wait()

    def on_signal(signum, frame):
        print(f"srun: forcing job termination (signal {signum})", file=sys.stderr, flush=True)
        end_step()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    first_bad = None
    while any(p.poll() is None for _, _, p in procs):
        for procid, host, p in procs:
            rc = p.poll()
            if rc not in (None, 0) and first_bad is None:
                first_bad = 128 - rc if rc < 0 else rc
                how = f"Killed by signal {-rc}" if rc < 0 else f"Exited with exit code {rc}"
                print(f"srun: error: {host}: task {procid}: {how}", file=sys.stderr, flush=True)
                if opt["kill"]:
                    print(f"srun: Terminating StepId={job['job_id']}.{step}", file=sys.stderr, flush=True)
                    end_step()
        time.sleep(0.1)
    for procid, host, p in procs:
        _killpg(p.pid, signal.SIGKILL)  # a step ends with its tasks: nothing of it lingers
    rcs = [p.returncode for _, _, p in procs]
    if first_bad is not None:
        return first_bad
    bad = [128 - rc if rc < 0 else rc for rc in rcs if rc]
    return max(bad) if bad else 0


# ---- ssh -------------------------------------------------------------------------------------

_SSH_VALUE = set("bcDEeFIiJLlmOoPpQRSWw")


def _relay(src, dst):
    try:
        for chunk in iter(lambda: src.read1(65536), b""):
            dst.write(chunk)
            dst.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        src.close()


def ssh(argv: list[str]) -> int:
    job = _job()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and len(argv[i]) > 1:
        a = argv[i]
        j = 1
        while j < len(a):
            if a[j] in _SSH_VALUE:
                if j == len(a) - 1:
                    i += 1
                break
            j += 1
        i += 1
    if i >= len(argv):
        print("usage: ssh [options] host command (stand-in: no interactive sessions)", file=sys.stderr)
        return 255
    host = argv[i].rpartition("@")[2]
    command = " ".join(argv[i + 1:])
    if host not in job["hosts"]:
        print(f"ssh: Could not resolve hostname {host}: Name or service not known", file=sys.stderr)
        return 255
    if not command:
        print("ssh (stand-in): no interactive sessions", file=sys.stderr)
        return 255
    node = job["hosts"].index(host)
    home = os.environ.get("HOME", "/root")
    env = {"HOME": home, "USER": os.environ.get("USER", "root"), "LOGNAME": os.environ.get("USER", "root"),
           "SHELL": "/bin/bash", "PATH": f"{os.path.dirname(os.path.abspath(__file__))}:/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8", "SSH_CONNECTION": "127.0.0.1 0 127.0.0.1 22"}
    env.update(_node_env(job, node))
    p = subprocess.Popen(["/bin/bash", "-c", command], env=env, cwd=home, start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal.signal(signal.SIGTERM, lambda s, f: os._exit(255))  # the remote command runs on
    signal.signal(signal.SIGHUP, lambda s, f: os._exit(255))
    signal.signal(signal.SIGINT, lambda s, f: os._exit(255))
    ts = [threading.Thread(target=_relay, args=(p.stdout, sys.stdout.buffer), daemon=True),
          threading.Thread(target=_relay, args=(p.stderr, sys.stderr.buffer), daemon=True)]
    for t in ts:
        t.start()
    rc = p.wait()
    for t in ts:
        t.join()
    return 128 - rc if rc < 0 else rc


# ---- pdsh ------------------------------------------------------------------------------------

def pdsh(argv: list[str]) -> int:
    _job()
    opts = {"S": False, "N": False, "w": None, "R": os.environ.get("PDSH_RCMD_TYPE", "rsh"),
            "l": os.environ.get("USER", "root")}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        flag = a[1:2]
        if flag in "SNbd":
            opts[flag] = True
        elif flag in "fwRltux":
            val = a[2:] or argv[i + 1]
            i += 0 if a[2:] else 1
            opts[flag] = val
        else:
            print(f"pdsh (stand-in): unsupported option {a}", file=sys.stderr)
            return 1
        i += 1
    command = " ".join(argv[i:])
    if not opts["w"] or not command:
        print("pdsh (stand-in): needs -w HOSTS and a command", file=sys.stderr)
        return 1
    if opts["R"] != "ssh":
        print(f"pdsh@{os.uname().nodename}: rcmd {opts['R']}: connect failed: Connection refused",
              file=sys.stderr)
        return 1
    hosts = expand_hostlist(opts["w"])
    me = f"pdsh@{os.uname().nodename}"
    ssh_args = os.environ.get("PDSH_SSH_ARGS_APPEND", "").split()
    lock = threading.Lock()
    procs = []

    def pump(host, src, dst):
        for line in iter(src.readline, b""):
            with lock:
                dst.write(line if opts["N"] else f"{host}: ".encode() + line)
                dst.flush()

    threads = []
    for n, host in enumerate(hosts):
        cmd = re.sub(r"%[hun%]", lambda m: {"%h": host, "%u": opts["l"], "%n": str(n), "%%": "%"}[m.group()],
                     command)
        p = subprocess.Popen(["ssh", *ssh_args, "-2", "-a", "-x", "-l", opts["l"], host, cmd],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((host, p))
        for src, dst in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
            t = threading.Thread(target=pump, args=(host, src, dst), daemon=True)
            t.start()
            threads.append(t)
    signal.signal(signal.SIGTERM, lambda s, f: os._exit(1))  # ssh clients and remote commands run on
    rcs = {}
    while len(rcs) < len(procs):
        for host, p in procs:
            if host not in rcs and p.poll() is not None:
                rcs[host] = p.returncode
                if p.returncode:
                    with lock:
                        print(f"{me}: {host}: ssh exited with exit code {p.returncode}", file=sys.stderr, flush=True)
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=5)
    return max(rcs.values()) if opts["S"] else 0


# ---- pkill -----------------------------------------------------------------------------------

def pkill(argv: list[str]) -> int:
    sig, full, pattern = signal.SIGTERM, False, None
    for a in argv:
        if a == "-f":
            full = True
        elif a.startswith("-") and pattern is None:
            name = a[1:].upper()
            sig = int(name) if name.isdigit() else getattr(signal, name if name.startswith("SIG") else "SIG" + name)
        else:
            pattern = a
    if pattern is None:
        print("pkill (stand-in): no pattern", file=sys.stderr)
        return 2
    job_id, node = os.environ.get("STANDIN_JOB_ID"), os.environ.get("STANDIN_NODE")
    if not job_id or node is None:
        print("pkill (stand-in): not inside an emulated job; refusing", file=sys.stderr)
        return 2
    spare, pid = set(), os.getpid()
    while pid > 1:  # pkill never matches itself (nor, here, the shell that runs it)
        spare.add(pid)
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    hit = 0
    for pid in job_pids(job_id, node):
        if pid in spare:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().rstrip(b"\0").split(b"\0")
            text = b" ".join(args if full else args[:1]).decode(errors="replace")
            if not full:
                text = os.path.basename(text)
            if re.search(pattern, text):
                os.kill(pid, sig)
                hit += 1
        except (OSError, ProcessLookupError):
            continue
    return 0 if hit else 1


def job_pids(job_id: str, node: str | None = None) -> list[int]:
    """Processes of the emulated job ``job_id`` (on ``node`` if given), by their environment."""
    want = {f"STANDIN_JOB_ID={job_id}".encode()}
    if node is not None:
        want.add(f"STANDIN_NODE={node}".encode())
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            out.append(int(d))
    return out


TOOLS = {"srun": srun, "scontrol": scontrol, "ssh": ssh, "pdsh": pdsh, "pkill": pkill}

if __name__ == "__main__":
    tool = sys.argv[1]
    os.environ["STANDIN_TOOL"] = tool
    sys.exit(TOOLS[tool](sys.argv[2:]))
