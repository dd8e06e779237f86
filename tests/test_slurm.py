"""`dialtune slurm`: the rendered sbatch script (pure tests, and the script actually run by bash
with stand-ins for srun/scontrol/python), and the per-node torchrun launcher.
(Jobs on a real one-node SLURM cluster: test_slurm_cluster.py.)"""
import json
import os
import shlex
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import REQUEUE_EXIT_CODE, SlurmError, render
from tests.conftest import ROOT

SLURM_PY = ROOT / "launch" / "slurm.py"
NODE_LAUNCHER = ROOT / "launch" / "node_launcher.py"
TRAIN_PY = ROOT / "launch" / "train.py"

NASTY = [
    "run.name=$(touch {m}/dollar-paren)",
    "run.name=`touch {m}/backtick`",
    "a;b",
    "x=1; touch {m}/semicolon",
    "'; touch {m}/quote; '",
    '"; touch {m}/dquote; "',
    "data.train_files=[a b.jsonl,c\tt.jsonl]",
    "${{HOME}}|&><*?~!#",
    "line\nbreak",
    "-m",
]


def nasty(markers: Path) -> list:
    return [n.format(m=markers) for n in NASTY]


def cli(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "launch.cli", "slurm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=env)


def sbatch_directives(script: str) -> list:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---- pure rendering -------------------------------------------------------------------------------

def test_gpu_job_one_srun_task_per_node_with_gres():
    script = render(["recipe=lora_bf16"], nodes=4, gpus_per_node=8, nproc_per_node=3, time="24:00:00",
                    partition="gpu", account="proj-1", qos="high", mem="256G", job_name="big", log_dir="/logs")
    d = sbatch_directives(script)
    for want in ("--nodes=4", "--ntasks-per-node=1", "--gres=gpu:8", "--time=24:00:00", "--partition=gpu",
                 "--account=proj-1", "--qos=high", "--mem=256G", "--job-name=big", "--requeue",
                 "--open-mode=append", "--signal=USR1@120", "--output=/logs/%x-%j.out"):
        assert want in d, (want, d)
    assert not any(x.startswith("--cpus-per-task") for x in d)  # GPU: the cluster's default (warned when short)
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--ntasks-per-node=1" in srun[0] and "--gres=gpu:8" in srun[0]
    assert "--nproc_per_node 8 " in script  # one rank per GPU, --nproc-per-node ignored
    assert '--nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID"' in script
    assert 'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert 'addr=$(scontrol show node "$first" -o 2>/dev/null | tr " " "\\n" | sed -n "s/^NodeAddr=//p")' in script
    assert "export MASTER_ADDR=${addr:-$first}" in script
    assert "SLURM_JOB_ID" in script.split("MASTER_PORT=", 1)[1].splitlines()[0]
    assert "OMP_NUM_THREADS" not in script
    assert f'"$rc" -eq {REQUEUE_EXIT_CODE}' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "trap 'forward USR1' USR1" in script and "trap 'forward TERM' TERM" in script
    assert "&\nstep=$!" in script and 'wait "$step"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_job_no_gres_threads_and_optional_directives():
    script = render([], nodes=1, nproc_per_node=2, log_dir="/l", signal_seconds=0)
    d = sbatch_directives(script)
    assert not any("gres" in x for x in d) and "--gres" not in script
    assert "--cpus-per-task=2" in d  # one CPU per rank by default
    assert not any(x.split("=")[0] in ("--partition", "--account", "--qos", "--mem", "--time", "--signal") for x in d)
    assert "--nproc_per_node 2 " in script and "OMP_NUM_THREADS" in script
    assert "--cpus-per-task=6" in sbatch_directives(render([], nproc_per_node=2, cpus_per_task=6, log_dir="/l"))


def _command_line(script: str) -> list:
    """The arguments of train.py as the batch shell will see them."""
    line = next(line for line in script.splitlines() if line.endswith(" &"))
    return shlex.split(line[:-2])


def test_resume_auto_and_no_progress_bar_unless_the_user_set_them():
    assert _command_line(render(["a=1"], log_dir="/l")) == [str(TRAIN_PY), "a=1", "train.resume=auto", "train.progress_bar=false"]
    for own in ("train.resume=none", "+train.resume=/ck/step_1", "++train.resume=auto", "~train.resume"):
        assert _command_line(render([own, "train.progress_bar=true"], log_dir="/l")) == [str(TRAIN_PY), own, "train.progress_bar=true"]
    # a job name names the log file: no '/'; SLURM's --signal takes at most 65535 s
    with pytest.raises(SlurmError, match="cannot hold '/'"):
        render([], job_name="a/b", log_dir="/l")
    with pytest.raises(SlurmError, match="above SLURM's limit of 65535 s"):
        render([], signal_seconds=70000, log_dir="/l")


@pytest.mark.parametrize("kw", [dict(job_name="a\nrm -rf /"), dict(partition="gpu a"), dict(time="1:00'"),
                                dict(log_dir="/tmp/with space"), dict(account="$(id)"), dict(nodes=0),
                                dict(cpus_per_task=0)])
def test_unsafe_directive_values_are_refused(kw):
    kw.setdefault("log_dir", "/l")
    with pytest.raises(SlurmError):
        render([], **kw)


def test_a_cpu_login_node_leaves_the_accelerator_to_the_gpu_nodes(tmp_path):
    """On a machine without a GPU dialtune names DeepSpeed's accelerator (cpu) for what runs
    there; `dialtune slurm` must not: sbatch passes its environment to the job (--export=ALL), and
    DS_ACCELERATOR=cpu would make DeepSpeed run on the CPUs of GPU nodes."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/bash\necho "${{DS_ACCELERATOR:-unset}}" > {tmp_path}/seen\necho 4242\n')
    (bin_ / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PATH"] = f"{bin_}:{env['PATH']}"
    proc = cli(f"run.root={tmp_path}", "run.name=r", "--log-dir", str(tmp_path / "logs"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seen").read_text().strip() == "unset"


def test_dry_run_cli_prints_the_script(tmp_path):
    markers = tmp_path / "m"
    markers.mkdir()
    ov = nasty(markers)[:3]
    # options before, between and after the overrides
    proc = cli("--dry-run", "--nodes", "2", f"run.root={tmp_path}", ov[0], "--gpus-per-node", "4", ov[1], ov[2],
               "--partition", "p1", "--time", "01:00:00")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash\n")
    d = sbatch_directives(script)
    assert {"--nodes=2", "--gres=gpu:4", "--partition=p1", "--time=01:00:00",
            f"--output={tmp_path}/slurm-logs/%x-%j.out"} <= set(d)
    expected = [str(TRAIN_PY), f"run.root={tmp_path}", *ov, "train.resume=auto", "train.progress_bar=false"]
    assert " ".join(shlex.quote(a) for a in expected) + " &" in script
    assert not (tmp_path / "slurm-logs").exists()  # a dry run creates nothing
    assert list(markers.iterdir()) == []
    # the log directory of a run.root the config resolves (an interpolation, a recipe's) is the resolved one
    home = cli("--dry-run", "run.root=${oc.env:DIALTUNE_TEST_ROOT}/runs", env={**os.environ, "DIALTUNE_TEST_ROOT": str(tmp_path)})
    assert home.returncode == 0 and f"--output={tmp_path}/runs/slurm-logs/%x-%j.out" in sbatch_directives(home.stdout), home.stderr
    bad = cli("--dry-run", "--job-name", "a b", "run.name=r")
    assert bad.returncode == 2 and bad.stderr.startswith("dialtune: error: --job-name") and "Traceback" not in bad.stderr


def test_each_submission_gets_its_own_run_directory(tmp_path):
    """Without run.name, the job's run name is pinned at submit time (config name + time), so two
    submissions never resume each other's run; a sweep's values are left to the job; an override
    that does not compose is one sentence before anything is queued."""
    from launch.slurm import pinned_run_name

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(0))
    pid = os.getpid()  # (two submissions in the same second: another process each)
    assert pinned_run_name(["recipe=demo", "optim.lr=1e-4"], now=0) == f"demo-{stamp}-{pid}"
    assert pinned_run_name(["-m", "optim.lr=1e-4,5e-4", "peft=dora", "data.seed=range(3)"], now=0) == f"tiny-dora-none-{stamp}-{pid}"
    proc = cli("--dry-run", f"run.root={tmp_path}", "recipe=demo")
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.endswith(" &"))
    assert re.search(r" run\.name=demo-\d{8}-\d{6}-\d+ train\.resume=auto train\.progress_bar=false &$", line), line
    assert re.search(r"^#SBATCH --job-name=dialtune-demo-\d{8}-\d{6}-\d+$", proc.stdout, re.M)
    bad = cli("--dry-run", "optim.lrr=1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "optim.lrr" in bad.stderr, bad.stderr


# ---- the rendered script, run by bash with stand-ins for srun, scontrol and python ------------------

def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_cluster(tmp_path):
    """A bin/ with fake srun (runs its command like one task on one node, forwarding USR1/TERM)
    and scontrol (logs its arguments), and a fake python in a directory whose name is itself an
    injection attempt; it records its argv and exits $FAKE_RC (or 85 on USR1 when FAKE_WAIT=1)."""
    rec = tmp_path / "rec"
    markers = tmp_path / "markers"
    bin_ = tmp_path / "bin"
    for d in (rec, markers, bin_):
        d.mkdir()
    pydir = tmp_path / "py $(touch pydir-marker);x"  # a relative marker: no "/" in a name
    pydir.mkdir()
    _exe(bin_ / "scontrol", '#!/bin/bash\necho "$*" >> "$FAKE_REC/scontrol"\n'
         '[ "$1 $2" = "show hostnames" ] && printf "node-a\\nnode-b\\n"\nexit 0\n')
    _exe(bin_ / "srun", """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_REC/srun_argv"
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_NNODES=1
"$@" &
child=$!
trap 'echo USR1 >> "$FAKE_REC/srun_signals"; kill -USR1 $child' USR1
trap 'echo TERM >> "$FAKE_REC/srun_signals"; kill -TERM $child' TERM
while kill -0 $child 2>/dev/null; do wait $child; done
wait $child
""")
    python = _exe(pydir / "python", """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_REC/python_argv"
echo "$OMP_NUM_THREADS" > "$FAKE_REC/omp"
if [ "${FAKE_WAIT:-}" = 1 ]; then
    trap 'echo USR1 >> "$FAKE_REC/python_signals"; exit 85' USR1
    touch "$FAKE_REC/ready"
    for _ in $(seq 300); do sleep 0.1; done
    exit 1
fi
exit "${FAKE_RC:-0}"
""")
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", FAKE_REC=str(rec), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_CPUS_PER_TASK="4", SLURM_NODEID="0", SLURM_NNODES="1")
    return dict(rec=rec, markers=markers, python=str(python), env=env, tmp=tmp_path)


def _script(fc, overrides, **kw):
    workdir = fc["tmp"] / "work $(touch workdir-marker)"
    workdir.mkdir(exist_ok=True)
    fc["workdir"] = workdir
    path = fc["tmp"] / "job.sbatch"
    path.write_text(render(overrides, nproc_per_node=2, log_dir="/l", python=fc["python"], workdir=str(workdir), **kw))
    return path


def _argv(path: Path) -> list:
    return path.read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("rc", [0, 3, REQUEUE_EXIT_CODE])
def test_script_quoting_and_exit_codes(fake_cluster, rc):
    """Every override reaches the training command verbatim and nothing in it runs; exit code 85
    requeues the job and exits 0, other exit codes pass through."""
    fc = fake_cluster
    ov = nasty(fc["markers"])
    proc = subprocess.run(["bash", str(_script(fc, ov))], env=dict(fc["env"], FAKE_RC=str(rc)),
                          capture_output=True, text=True, timeout=30, cwd=str(fc["markers"]))
    assert list(fc["markers"].iterdir()) + list(fc["workdir"].iterdir()) == [], "the shell executed an override or path"
    assert _argv(fc["rec"] / "python_argv") == [
        "-u", str(NODE_LAUNCHER), "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
        "--master_addr", "node-a", "--master_port", str(15000 + 4242 % 15000), str(TRAIN_PY), *ov, "train.resume=auto", "train.progress_bar=false"]
    srun = _argv(fc["rec"] / "srun_argv")
    assert srun[:2] == ["--ntasks-per-node=1", "--cpus-per-task=4"] and srun[2] == "bash"
    assert (fc["rec"] / "omp").read_text().strip() == "2"  # 4 CPUs for 2 ranks
    scontrol = (fc["rec"] / "scontrol").read_text().splitlines()
    if rc == REQUEUE_EXIT_CODE:
        assert proc.returncode == 0 and scontrol[-1] == "requeue 4242", (proc.stdout, proc.stderr)
        assert "asked to be requeued" in proc.stdout
    else:
        assert proc.returncode == rc and not any("requeue" in s for s in scontrol), (proc.stdout, proc.stderr)


@pytest.mark.parametrize("cpus, warned", [("2", True), ("16", False)])
def test_gpu_job_with_fewer_cpus_than_ranks_warns(fake_cluster, cpus, warned):
    """4 GPU ranks on the cluster's default CPUs (often 1-2 per task): each rank's Python process
    needs a core to keep its GPU busy, so the job log says so, with what to ask for."""
    fc = fake_cluster
    env = {k: v for k, v in fc["env"].items() if k != "SLURM_CPUS_PER_TASK"}
    proc = subprocess.run(["bash", str(_script(fc, ["recipe=demo"], gpus_per_node=4))], env=dict(env, SLURM_CPUS_ON_NODE=cpus),
                          capture_output=True, text=True, timeout=30, cwd=str(fc["tmp"]))
    assert proc.returncode == 0, proc.stderr
    warning = ("dialtune: warning: 2 CPU(s) for 4 GPU ranks on this node (the cluster's default: no --cpus-per-task); "
               "ranks that share a core leave their GPUs waiting: resubmit with --cpus-per-task 32 or more")
    assert (warning in proc.stderr) == warned, proc.stderr
    assert "--nproc_per_node 4" in " ".join(_argv(fc["rec"] / "python_argv"))


def test_batch_shell_forwards_usr1_to_the_step(fake_cluster):
    fc = fake_cluster
    p = subprocess.Popen(["bash", str(_script(fc, ["x=1"]))], env=dict(fc["env"], FAKE_WAIT="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        while not (fc["rec"] / "ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (fc["rec"] / "ready").exists()
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert "batch shell got SIGUSR1" in out, out
    assert (fc["rec"] / "srun_signals").read_text().split() == ["USR1"]
    assert (fc["rec"] / "python_signals").read_text().split() == ["USR1"]
    assert p.returncode == 0 and (fc["rec"] / "scontrol").read_text().splitlines()[-1] == "requeue 4242", out


# ---- the per-node launcher: torchrun that keeps exit code 85 and forwards signals ------------------

WORKER = r'''
import json, os, signal, sys, time
from pathlib import Path
out = Path(next(a[4:] for a in sys.argv[1:] if a.startswith("out=")))
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
(out / f"argv-{restart}.json").write_text(json.dumps({"argv": sys.argv[1:], "rank": os.environ.get("RANK")}))
if os.environ.get("WORKER_RC"):
    sys.exit(int(os.environ["WORKER_RC"]))
if restart != "0":
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
def on_term(s, f):  # a checkpoint that takes a moment, then the rank's own exit code
    time.sleep(1.5)
    (out / "saved").touch()
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
(out / "ready").touch()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
(out / "signalled").write_text(str(len(got)))
sys.exit(85 if got else 1)
'''


def _torchrun(worker, out, env, launcher=(str(NODE_LAUNCHER),)):
    return subprocess.Popen([sys.executable, *launcher, "--nnodes", "1", "--node_rank", "0",
                             "--nproc_per_node", "1", str(worker), f"out={out}", "a;b"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _signal_launcher(tmp_path, sig):
    """Start the node launcher on WORKER, send `sig` to the launcher only once the worker is
    ready (it must pass it on and keep waiting); (launcher process, its output, the env)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SLURM_RESTART_COUNT", None)
    p = _torchrun(worker, tmp_path, env)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert (tmp_path / "ready").exists(), p.communicate(timeout=5)[0] if p.poll() is not None else "no worker"
        p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p, out, env


def test_node_launcher_forwards_usr1_and_keeps_exit_code_85(tmp_path):
    p, out, env = _signal_launcher(tmp_path, signal.SIGUSR1)
    worker = tmp_path / "worker.py"
    assert p.returncode == REQUEUE_EXIT_CODE, out
    assert "failed (exitcode" not in out, out  # torch-elastic's ERROR line, for a rank that stopped as asked
    assert (tmp_path / "signalled").read_text() == "1"
    rec = json.loads((tmp_path / "argv-0.json").read_text())
    assert rec == {"argv": [f"out={tmp_path}", "a;b"], "rank": "0"}
    # any other failure keeps its code
    p = _torchrun(worker, tmp_path, dict(env, WORKER_RC="3"))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3 and "failed (exitcode: 3)" in out, out
    # a batch script rendered before the launcher had its own file (a job requeued after an
    # upgrade) calls `launch/slurm.py torchrun ...`: the same launcher runs
    p = _torchrun(worker, tmp_path, dict(env, WORKER_RC=str(REQUEUE_EXIT_CODE)), launcher=(str(SLURM_PY), "torchrun"))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == REQUEUE_EXIT_CODE, out


def test_node_launcher_lets_ranks_finish_after_sigterm(tmp_path):
    """torchrun (torch >= 2.13: PET_SIGNALS_TO_HANDLE) would handle SIGTERM itself, stop the ranks
    and exit 143; the launcher passes it on and waits, so the rank saves and its code comes back."""
    p, out, _ = _signal_launcher(tmp_path, signal.SIGTERM)
    assert (tmp_path / "saved").exists() and p.returncode == 7, out
    assert "death signal" not in out, out


def test_submission_refuses_what_the_job_would_stop_on_but_not_the_nodes_paths(tmp_path):
    """The start-up checks of launch/train.py run at submission (a dry run warns and still shows
    the script); data files that only the nodes see are left to the job. --time is checked too."""
    proc = cli(f"run.root={tmp_path}", "--gpus-per-node", "4", "quant=int8", "deepspeed=zero3")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "ZeRO-3" in errors[0], proc.stderr
    assert not (tmp_path / "slurm-logs").exists()
    proc = cli("--dry-run", f"run.root={tmp_path}", "--gpus-per-node", "4", "quant=int8", "deepspeed=zero3")
    assert proc.returncode == 0 and proc.stdout.startswith("#!/bin/bash") and "dialtune: warning: quant=int8" in proc.stderr
    proc = cli("--dry-run", f"run.root={tmp_path}", "--gpus-per-node", "4", "data=custom", "data.train_files=[/nodes/only.jsonl]")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    for limit, said in (("abc", "--time 'abc' is not a SLURM time limit"), ("25h", "--time '25h' is not a SLURM time limit"),
                       ("1", "--signal-seconds 120 is not below --time 1 (60 s)")):
        proc = cli("--dry-run", f"run.root={tmp_path}", "run.name=t", "--time", limit)
        assert proc.returncode == 2 and proc.stderr.startswith(f"dialtune: error: {said}"), proc.stderr
    assert cli("--dry-run", f"run.root={tmp_path}", "run.name=t", "--time", "1-12:00").returncode == 0
