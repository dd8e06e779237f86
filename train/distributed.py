"""Process-group setup for deepspeed / torchrun / plain python, and small collectives."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import time

import torch
import torch.distributed as dist

from train.config import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, local_rank, world).

    Without a launcher (plain `python launch/train.py`) the env a one-process group needs is
    filled in, so DeepSpeed does not fall back to MPI discovery.
    """
    import deepspeed

    if problem := srun_tasks_problem(os.environ) or launcher_env_problem(os.environ):
        raise ConfigError(problem)
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        # DeepSpeed prints "deepspeed_shm_comm_op built successfully" per rank and run (also when
        # the op was built long ago); a failing build still raises
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
        except RuntimeError as e:  # (DistStoreError, DistNetworkError are RuntimeErrors)
            if problem := rendezvous_problem(e, os.environ, timeout_minutes):
                raise RendezvousError(problem) from None
            raise
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        release_shm_workspace(rank, world)
    return rank, local_rank, world


def srun_tasks_problem(env) -> str | None:
    """`srun -n N python launch/train.py` starts N processes with no RANK/WORLD_SIZE: each would
    train alone into the same run directory. One sentence saying how to launch instead."""
    tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" in env or not tasks.isdigit() or int(tasks) <= 1:
        return None
    return (f"started by srun as {tasks} tasks without RANK/WORLD_SIZE, which would give {tasks} separate one-process trainings "
            "writing one run directory; submit with `dialtune slurm` (torchrun on every node), or run one srun task per node "
            "that starts torchrun or the deepspeed launcher.")


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env_problem(env) -> str | None:
    """One sentence for a multi-process environment DeepSpeed cannot start from: some of
    LAUNCHER_VARS set, others not (DeepSpeed then tries MPI discovery: "No module named 'mpi4py'"),
    a rank that is no number or not below WORLD_SIZE, a port that is none. A lone WORLD_SIZE=1 is
    one process; mpirun's OMPI_COMM_WORLD_* is DeepSpeed's MPI discovery, left to it."""
    if "OMPI_COMM_WORLD_RANK" in env or ("RANK" not in env and env.get("WORLD_SIZE", "1").strip() == "1"):
        return None
    given = ", ".join(f"{k}={env[k]}" for k in LAUNCHER_VARS if k in env)
    missing = [k for k in LAUNCHER_VARS if not env.get(k, "").strip()]
    if missing:
        return (f"{given} {'is' if ',' not in given else 'are'} set, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: a run of several processes "
                f"needs all of {', '.join(LAUNCHER_VARS)}, which launchers such as torchrun and deepspeed set; start it with "
                "one of them (or `dialtune train --nproc N`), or unset RANK and WORLD_SIZE to run one process.")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if not env[key].strip().isdigit():
            return f"{key}={env[key]} is not a whole number; set it to one (or start the run with torchrun or deepspeed, which set it)."
    rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    if world < 1 or rank >= world:
        return (f"RANK={rank} is not below WORLD_SIZE={world}: the ranks of a run are 0 to WORLD_SIZE-1, each process with "
                "its own; set WORLD_SIZE to the number of processes.")
    if not 0 < port < 65536:
        return f"MASTER_PORT={port} is not a port number; set it to a free port (1-65535) of MASTER_ADDR's host."
    return None


class RendezvousError(ConfigError):
    """The ranks did not meet: every rank that waited says so (rank 0 alone may be the one missing)."""

    every_rank = True  # (launch/train.py's fail(): rank 0 and each node's first rank may be the ones missing)


def rendezvous_problem(e: BaseException, env, timeout_minutes: float) -> str | None:
    """One sentence for torch.distributed's rendezvous failures (TCPStore: rank 0 waiting for the
    others, another rank failing to reach rank 0, MASTER_PORT in use), else None."""
    text = str(e).split("\n", 1)[0]
    where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    rank, world = env.get("RANK", "?"), env.get("WORLD_SIZE", "?")
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"rank {rank} cannot listen on MASTER_PORT={env.get('MASTER_PORT')}: the port is in use on this host; "
                "choose a free MASTER_PORT (the same for every rank).")
    if "timed out" in text.lower() or "clients joined" in text:
        return (f"rank {rank} of {world} could not meet the other ranks at {where} within {timeout_minutes:g} minute(s) "
                f"(deepspeed.timeout_minutes): start all {world} ranks (each with its own RANK, the same WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT), and check that the other hosts can reach rank 0's host at that address and port.")
    return None


SHM_WORKSPACE = "deepspeed_allreduce_buffer"


def shm_workspace_path(rank: int) -> str:
    return (f"/dev/shm/{SHM_WORKSPACE}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed CPU allreduce workspace once every rank has mapped it.

    On CPU, when all ranks are on one node (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed's
    init creates a 67 MB shared-memory workspace per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, maps every peer's, and never
    unlinks them: each CPU run would leave 2 x 67 MB of RAM-backed files behind until reboot
    (17 GB had piled up on a development machine). Every rank maps all peers' workspaces before
    its init returns, so after a barrier the names can go; the mappings stay valid and the memory
    is freed when the processes exit, also after a crash or kill -9.
    """
    if world > 1:
        dist.barrier()
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:
        pass


def device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, dev: torch.device) -> list[float]:
    """Sum a list of numbers over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def as_problem(e: BaseException | None) -> str | None:
    """A start-up failure as agree() takes it: a one-sentence error as it is, anything else with its type."""
    if e is None:
        return None
    from train.config import ConfigError

    from data_pipeline.chat import DataError

    return str(e) if isinstance(e, (ConfigError, DataError)) else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def agree(problem: str | None) -> str | None:
    """Every rank's start-up problem (one sentence, or None) made every rank's: the lowest failing
    rank's, naming that rank and its host when not all ranks had one. A problem only some nodes have
    (a node-local path, a node-local data cache that fails to build) then stops every rank with its
    sentence, where the others would wait in their next collective until the timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    world = dist.get_world_size()
    got: list = [None] * world
    dist.all_gather_object(got, (problem, socket.gethostname()))
    bad = [r for r, (p, _) in enumerate(got) if p]
    if not bad:
        return None
    first, host = got[bad[0]]
    return first if len(bad) == world else f"rank {bad[0]} on {host} ({len(bad)} of {world} ranks): {first}"


def shared_dir_problem(path: str, rank: int, dev: torch.device) -> str | None:
    """Multi-process runs need one run directory that every rank sees (checkpoints: rank 0 renames
    each rank's shards into place and writes `latest`): rank 0 writes a token into `path`, every
    rank reads it back. One sentence when some rank cannot (a node-local run.root), else None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    marker = os.path.join(path, ".dialtune-shared-check")
    token = [f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}" if rank == 0 else None]
    if rank == 0:
        with open(marker, "w") as f:
            f.write(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        with open(marker) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    missing = all_sum([0.0 if seen else 1.0], dev)[0]
    if rank == 0:
        os.remove(marker)
    if missing:
        return (f"{int(missing)} of {dist.get_world_size()} ranks cannot see what rank 0 writes in {path} (rank 0 runs on "
                f"{token[0].split(':')[0]}): a run on several nodes needs run.root on a filesystem that every node mounts.")
    return None