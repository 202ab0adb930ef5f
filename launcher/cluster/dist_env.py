"""Who am I? torchrun, the deepspeed launcher, srun or a plain process -> one frozen RankEnv.

| variable | torchrun | deepspeed launcher | srun (one task per rank) | plain `python` |
|---|---|---|---|---|
| rank | RANK | RANK | SLURM_PROCID | 0 |
| world_size | WORLD_SIZE | WORLD_SIZE | SLURM_NTASKS | 1 |
| local_rank | LOCAL_RANK | LOCAL_RANK | SLURM_LOCALID | 0 |
| local_world_size | LOCAL_WORLD_SIZE | LOCAL_SIZE | SLURM_NTASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE | 1 |
| node_rank | GROUP_RANK | CROSS_RANK | SLURM_NODEID | 0 |
| nnodes | WORLD_SIZE / LOCAL_WORLD_SIZE | CROSS_SIZE | SLURM_NNODES | 1 |
| master | MASTER_ADDR/PORT | MASTER_ADDR/PORT | MASTER_ADDR/PORT, else first node of SLURM_STEP_NODELIST and a port from SLURM_JOB_ID | 127.0.0.1, a free port |

`from_environ` is pure (reads a mapping, returns a RankEnv); `export` writes the variables
`torch.distributed` / `deepspeed.init_distributed` read (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) into an environment, so one code path serves every launcher.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, MutableMapping

DEFAULT_ADDR = "127.0.0.1"
# The rendezvous port of a Slurm job: PORT_BASE + job id % PORT_SPAN, the same on every node.
# The one definition: `slurm_port` here, and slurm/job.sbatch's MASTER_PORT line, rendered from
# these two numbers (tests/test_slurm_render.py evaluates that line against slurm_port).
PORT_BASE = 15000
PORT_SPAN = 10000
# Linux hands out local ports for outgoing connections from ip_local_port_range (32768-60999 by
# default): a port in it may be taken by any connection on the node. The rendezvous ports
# (15000-24999) and the preflight's store ports (preflight_port: 5000-14999) are below it.
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int  # 0: not chosen yet (plain process); export() picks a free one
    launcher: str     # torchrun | deepspeed | srun | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/"
                f"{self.local_world_size}, node {self.node_rank}/{self.nnodes}) via {self.launcher}")


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {key} is missing")
        return default
    m = re.match(r"\s*(\d+)", raw)  # SLURM_*_TASKS_PER_NODE look like "4(x2)" or "4,2"
    if not m:
        raise ValueError(f"environment variable {key}={raw!r} is not a number")
    return int(m.group(1))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read Slurm node list {nodelist!r}")
    base, ranges = m.group(1), m.group(2)
    if not ranges:
        return base
    first = ranges.split(",")[0].split("-")[0]
    return f"{base}{first}"


def slurm_port(job_id: str) -> int:
    """A port derived from the job id (PORT_BASE .. PORT_BASE + PORT_SPAN - 1), the same on every
    node of the job; the job script sets MASTER_PORT to the same number."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def preflight_port(master_port: int) -> int:
    """The port of the preflight's TCP store on node 0: PORT_SPAN below the rendezvous port, so
    neither meets the other (or another job's) and both stay under the ephemeral range."""
    return master_port - PORT_SPAN


def ephemeral_range(path: str = EPHEMERAL_RANGE) -> tuple[int, int] | None:
    """This machine's (low, high) local port range for outgoing connections; None if unreadable."""
    try:
        with open(path, encoding="ascii") as fh:
            low, high = (int(x) for x in fh.read().split()[:2])
    except (OSError, ValueError):
        return None
    return low, high


def port_note(ports: Mapping[str, int], path: str = EPHEMERAL_RANGE) -> str:
    """What the preflight says of the job's ports against this node's ephemeral range."""
    rng = ephemeral_range(path)
    listed = ", ".join(f"{what} {port}" for what, port in ports.items())
    if rng is None:
        return f"ports: {listed}; this node's ephemeral port range is unreadable ({path})"
    inside = [what for what, port in ports.items() if rng[0] <= port <= rng[1]]
    if not inside:
        return f"ports: {listed}, outside this node's ephemeral range {rng[0]}-{rng[1]}"
    return (f"WARNING: ports: {listed}; {' and '.join(inside)} inside this node's ephemeral range "
            f"{rng[0]}-{rng[1]} ({path}): an outgoing connection on the node can hold the port "
            "and the rendezvous then fails (EADDRINUSE); ask for a range above "
            f"{PORT_BASE + PORT_SPAN} (sysctl net.ipv4.ip_local_port_range), or reserve these "
            "ports (net.ipv4.ip_local_reserved_ports)")


def from_environ(env: Mapping[str, str] | None = None) -> RankEnv:
    """The rank's place in the job from launcher variables (see the module table)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or ""
    port = _int(env, "MASTER_PORT", 0)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
            local_world = _int(env, "LOCAL_SIZE", world)
            node_rank = _int(env, "CROSS_RANK", 0)
            nnodes = _int(env, "CROSS_SIZE", max(1, world // local_world))
        else:
            launcher = "torchrun"
            local_world = _int(env, "LOCAL_WORLD_SIZE", world)
            node_rank = _int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0))
            nnodes = max(1, world // local_world) if local_world else 1
        return RankEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0), local_world,
                       node_rank, nnodes, addr or DEFAULT_ADDR, port, launcher)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1))
        nnodes = _int(env, "SLURM_NNODES", _int(env, "SLURM_STEP_NUM_NODES", 1))
        local_world = _int(env, "SLURM_STEP_TASKS_PER_NODE",
                           _int(env, "SLURM_NTASKS_PER_NODE", max(1, world // nnodes)))
        if not addr:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
            addr = first_host(nodes) if nodes else DEFAULT_ADDR
        if not port:
            port = slurm_port(env.get("SLURM_JOB_ID", "0"))
        return RankEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0),
                       local_world, _int(env, "SLURM_NODEID", 0), nnodes, addr, port, "srun")
    return RankEnv(0, 1, 0, 1, 0, 1, addr or DEFAULT_ADDR, port, "single")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind((DEFAULT_ADDR, 0))
        return int(s.getsockname()[1])


def export(rank_env: RankEnv, env: MutableMapping[str, str] | None = None) -> RankEnv:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT in env
    (default os.environ) for torch.distributed; picks a free port for a plain process.
    Returns the RankEnv with the port filled in."""
    env = os.environ if env is None else env
    if not rank_env.master_port:
        rank_env = RankEnv(**{**vars(rank_env), "master_port": free_port()})
    env.update({"RANK": str(rank_env.rank), "WORLD_SIZE": str(rank_env.world_size),
                "LOCAL_RANK": str(rank_env.local_rank),
                "LOCAL_WORLD_SIZE": str(rank_env.local_world_size),
                "MASTER_ADDR": rank_env.master_addr, "MASTER_PORT": str(rank_env.master_port)})
    return rank_env
