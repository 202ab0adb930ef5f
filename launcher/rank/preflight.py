"""`ftlaunch preflight RUN_DIR/resolved.yaml`: is every node fit to train, before any rank starts?

The job script runs it as one srun task per node (`cluster.preflight: true`). Each node checks
itself (`check_node`): GPUs visible = gpus_per_node (torch's device count in the task's own
environment, as the ranks will count them), their model, compute capability, free memory and the
driver; what the run's optimizer needs on the node (launcher/rank/node_checks.py); the run
directory writable, its write speed,
and the same directory as the batch node's (a token the job script wrote there, compared with
the one it passed in FTLAUNCH_PREFLIGHT_TOKEN); model and data readable; with NVMe offload,
libaio for DeepSpeed's async_io op, `nvme_path` writable and the memlock limit above the pinned
swap buffers (`check_nvme`); Python, torch, deepspeed, transformers and ftlaunch versions. The
reports meet in a TCP store on node 0 (the rendezvous address, port MASTER_PORT - PORT_SPAN:
dist_env.preflight_port); node 0 judges them together (`judge`: missing reports,
versions that differ from the other nodes', GPU memory against the memory plan), then, if every
node passed, all nodes run a timed all-reduce (NCCL on GPUs, gloo otherwise) whose bus bandwidth
is printed. Node 0 writes RUN_DIR/preflight.json and preflight.txt (per node: GPUs, free memory,
write speed; the all-reduce; the checkpoint write time against cluster.grace_s) and, for the job
script, one line per failed node (`NAME reason; reason`) to --bad-nodes.

Exit status: 0 when this node (on node 0: every node) passed, 1 otherwise. EXIT_PREFLIGHT is the
job's exit code when the preflight stops it. Importable on a login node: torch is imported only
inside the functions that need it.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Mapping, Optional
from dataclasses import dataclass

from launcher import __version__
from launcher.rank import collectives, node_checks
from launcher.cluster import dist_env, layout

EXIT_PREFLIGHT = layout.EXIT_PREFLIGHT  # the job stopped because the preflight refused to go on
MODULES = ("torch", "deepspeed", "transformers")
WRITE_PROBE_BYTES = 32 * 2**20      # written (and fsynced) to time the run directory
SUMMARY_JSON, SUMMARY_TEXT = "preflight.json", "preflight.txt"
TOKEN = os.path.join("preflight", "token")
GiB = 2**30


# ------------------------------------------------------------------ one node
def gpu_inventory(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The GPUs this task's ranks will see, counted as their torch counts them
    (launcher/rank/node_checks.py): [{"index", "name", "capability", "uuid", "free", "total"}]."""
    from launcher.rank import node_checks
    return node_checks.gpu_inventory()


def versions() -> dict[str, Optional[str]]:
    """Python and the packages the ranks import (None: not importable here), without importing."""
    import importlib.metadata
    import importlib.util
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "ftlaunch": __version__}
    for name in MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        try:
            out[name] = importlib.metadata.version(name) if found else None
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def check_run_dir(run_dir: str, token: Optional[str], node: str) -> tuple[list[str], Optional[float]]:
    """(problems, write speed in bytes/s): the token the job script wrote is there, and a probe
    file can be written, fsynced and removed."""
    problems = []
    if token is not None:
        path = os.path.join(run_dir, TOKEN)
        try:
            with open(path, encoding="utf-8") as fh:
                seen = fh.read().strip()
        except OSError as exc:
            seen = f"unreadable ({exc.strerror or exc})"
        if seen != token:
            problems.append(f"run directory {run_dir} is not the one the batch node sees (shared "
                            f"file system?): {path} holds {seen!r}, expected {token!r}")
    probe = os.path.join(run_dir, "preflight", f"write-probe-{node}")
    chunk = os.urandom(4 * 2**20)
    try:
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        start = time.perf_counter()
        with open(probe, "wb") as fh:
            for _ in range(WRITE_PROBE_BYTES // len(chunk)):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - start
        os.remove(probe)
    except OSError as exc:
        problems.append(f"cannot write in the run directory {run_dir}: {exc.strerror or exc}")
        return problems, None
    return problems, WRITE_PROBE_BYTES / max(seconds, 1e-9)


def check_inputs(cfg) -> list[str]:
    """Model, tokenizer and data readable from this node."""
    problems = []
    for key, path in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer),
                      ("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if path is None:
            continue
        try:
            if os.path.isdir(path):
                names = os.listdir(path)
                if key == "model.path":
                    with open(os.path.join(path, "config.json"), "rb") as fh:
                        fh.read(1)
                elif not names:
                    problems.append(f"{key} {path}: an empty folder")
            else:
                with open(path, "rb") as fh:
                    fh.read(1)
        except OSError as exc:
            problems.append(f"{key} {path}: not readable here ({exc.strerror or exc})")
    return problems


def nvme_pinned_per_rank(cfg) -> Optional[int]:
    """Page-locked bytes one rank's NVMe swappers allocate (launcher/memory/nvme.py; the model
    on the meta device), or None where the plan cannot be made."""
    try:
        from launcher.dsconfig import build as ds_config
        from launcher.memory import nvme
        from launcher.memory.inventory import inventory
        from launcher.memory.terms import param_groups
        inv = inventory(cfg)
        built = ds_config.build(cfg)
        ds = cfg.deepspeed
        sizes = nvme.pinned(param_groups(inv, cfg.train.weight_decay), cfg.world_size,
                            inv.lp_bytes, built.get("zero_optimization", {}), built.get("aio") or {},
                            ds.offload_optimizer == "nvme", ds.offload_param == "nvme")
        return sum(sizes.values())
    except Exception:  # noqa: BLE001 - the other checks still run; the limit is then judged alone
        return None


def check_nvme(cfg, aio_compatible=None, pinned: Optional[int] = None) -> list[str]:
    """NVMe offload on this node: DeepSpeed's async_io op can be built (libaio), nvme_path is a
    writable folder, and the memlock limit (`ulimit -l`) lets each rank lock its swap buffers
    (DeepSpeed mlock()s them: ops/csrc/pin_memory/page_alloc.cpp). aio_compatible: for tests."""
    import resource
    ds = cfg.deepspeed
    if "nvme" not in (ds.offload_optimizer, ds.offload_param):
        return []
    problems = []
    if aio_compatible is None:
        try:
            from deepspeed.ops.op_builder import AsyncIOBuilder
            aio_compatible = bool(AsyncIOBuilder().is_compatible(verbose=False))
        except Exception:  # noqa: BLE001 - an import or compiler failure means the op cannot build
            aio_compatible = False
    if not aio_compatible:
        problems.append("NVMe offload: DeepSpeed's async_io op cannot be built here (libaio and "
                        "its headers not found: install libaio-dev / libaio-devel, or set CFLAGS "
                        "and LDFLAGS to where they are)")
    path = ds.nvme_path or ""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".ftlaunch-probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"x" * 4096)
        os.remove(probe)
    except OSError as exc:
        problems.append(f"deepspeed.nvme_path {path}: not writable here ({exc.strerror or exc})")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    need = pinned if pinned is not None else nvme_pinned_per_rank(cfg)
    if soft != resource.RLIM_INFINITY and (need is None or soft < need):
        want = f"{need / GiB:.1f} GiB per rank" if need is not None else "its swap buffers"
        problems.append(f"NVMe offload: ulimit -l (locked memory) is {soft // 1024} KiB, DeepSpeed "
                        f"pins {want}: raise it (`ulimit -l unlimited` in cluster.setup, "
                        "limits.conf memlock, or Slurm's PropagateResourceLimits)")
    return problems


def check_node(run_file: str, env: Mapping[str, str], node: str) -> tuple[dict[str, Any], Any]:
    """This node's report (JSON-able) and its config (None when the run file did not load)."""
    from launcher.config.errors import ConfigError
    from launcher.config.runfile import load
    start = time.perf_counter()
    run_dir = os.path.dirname(os.path.abspath(run_file))
    report: dict[str, Any] = {"node": node, "host": socket.gethostname(), "problems": [],
                              "gpus": [], "write_bytes_s": None, "versions": versions()}
    problems = report["problems"]
    problems += [f"{name} is not installed for {sys.executable}" for name, v in
                 report["versions"].items() if v is None]
    cfg = None
    try:
        cfg = load(run_file, [])
    except ConfigError as exc:
        problems.append(f"cannot load {run_file}: {exc.render()}")
    except OSError as exc:
        problems.append(f"cannot read {run_file}: {exc.strerror or exc} (is the run directory shared?)")
    dir_problems, report["write_bytes_s"] = check_run_dir(run_dir, env.get("FTLAUNCH_PREFLIGHT_TOKEN"),
                                                          node)
    problems += dir_problems
    if cfg is not None:
        problems += check_inputs(cfg)
        problems += check_nvme(cfg)
        from launcher.model.device import job_device
        gpu = job_device(cfg) == "cuda"
        if gpu:
            try:
                report["gpus"] = gpu_inventory(env)
            except (OSError, subprocess.SubprocessError, ImportError, RuntimeError) as exc:
                problems.append(f"cannot list the GPUs: {exc}")
            want = cfg.cluster.gpus_per_node
            if len(report["gpus"]) != want:
                problems.append(f"{len(report['gpus'])} GPU(s) visible to torch "
                                f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')}), "
                                f"cluster.gpus_per_node is {want}")
            report["driver"] = node_checks.driver_version(env)
            try:
                report.update(node_checks.cuda_versions())
            except ImportError:
                pass
        report["checks"] = node_checks.optimizer_checks(cfg, gpu)
        problems += [f"{c['check']}: {c['detail']}; fix: {c['fix']}" for c in report["checks"]
                     if not c["ok"]]
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report, cfg


# ------------------------------------------------------------------ all nodes, on node 0
def judge(reports: Mapping[int, Optional[dict]], names: Mapping[int, str],
          per_gpu_need: Optional[int] = None) -> dict[str, list[str]]:
    """{node name: reasons} for every node that failed: its own problems, no report, versions
    that differ from most nodes', GPUs with less free memory than the plan needs. Pure."""
    bad: dict[str, list[str]] = {}
    for i, name in names.items():
        report = reports.get(i)
        if report is None:
            bad[name] = ["no report (the node did not start `ftlaunch preflight`, or it could not "
                         "reach node 0 in time)"]
        elif report["problems"]:
            bad[name] = list(report["problems"])
    present = {i: r for i, r in reports.items() if r is not None}
    keys = sorted({k for r in present.values() for k in r["versions"]})
    for key in keys:
        counts = collections.Counter(r["versions"].get(key) for r in present.values())
        common, n = counts.most_common(1)[0]
        if n * 2 <= len(present) and 0 in present:   # no majority: node 0's is the reference
            common = present[0]["versions"].get(key)
        for i, r in present.items():
            got = r["versions"].get(key)
            if got != common and got is not None:
                bad.setdefault(names[i], []).append(f"{key} {got}, the other nodes have {common}")
    if per_gpu_need:
        for i, r in present.items():
            for g in r.get("gpus", []):
                if g["free"] < per_gpu_need:
                    bad.setdefault(names[i], []).append(
                        f"GPU {g['index']}: {g['free'] / GiB:.1f} GiB free, the memory plan needs "
                        f"{per_gpu_need / GiB:.1f} GiB")
    return bad


def plan_numbers(cfg) -> dict[str, Any]:
    """Per-GPU need and the checkpoint's size from the memory plan (torch and transformers are
    imported here). A checkpoint holds every weight and, for what trains, fp32 master weights and
    Adam's two moments (12 bytes a parameter)."""
    from launcher import memory
    plan = memory.plan(cfg)
    return {"per_gpu": int(plan.total_per_gpu) if plan.device == "cuda" else None,
            "checkpoint_bytes": int(plan.inv.weight_bytes + 12 * plan.inv.trainable)}


def allreduce(store, rank: int, world: int, timeout_s: int) -> dict[str, Any]:
    """A timed all-reduce across the nodes (one process each): NCCL on a GPU, gloo otherwise."""
    import datetime

    import torch
    import torch.distributed as dist
    gpu = torch.cuda.is_available()
    backend, device = ("nccl", torch.device("cuda", 0)) if gpu else ("gloo", torch.device("cpu"))
    size, iters = (256 * 2**20, 10) if gpu else (8 * 2**20, 5)
    dist.init_process_group(backend, store=dist.PrefixStore("allreduce", store), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        x = torch.ones(size // 4, dtype=torch.float32, device=device)
        collectives.all_reduce_(x)              # warm-up: connections, buffers
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            collectives.all_reduce_(x)
        if gpu:
            torch.cuda.synchronize()
        each = (time.perf_counter() - start) / iters
    finally:
        dist.destroy_process_group()
    algbw = size / each
    return {"backend": backend, "bytes": size, "iterations": iters, "seconds_each": each,
            "algbw_bytes_s": algbw, "busbw_bytes_s": algbw * 2 * (world - 1) / world}


# ------------------------------------------------------------------ summary
def _rate(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 1e6:.0f} MB/s"


def summary_text(reports: Mapping[int, Optional[dict]], names: Mapping[int, str],
                 bad: Mapping[str, list[str]], net: Optional[dict], notes: list[str],
                 seconds: float) -> str:
    verdict = ("all passed" if not bad else
               f"{len(bad)} of {len(names)} node(s) failed: {', '.join(sorted(bad))}")
    lines = [f"preflight: {len(names)} node(s), {verdict} ({seconds:.1f} s)",
             f"  {'node':<12} {'GPUs':>4} {'min free GiB':>12} {'write':>10}  versions"]
    for i, name in names.items():
        r = reports.get(i)
        if r is None:
            lines.append(f"  {name:<12} no report")
            continue
        free = min((g["free"] for g in r["gpus"]), default=None)
        v = ", ".join(f"{k} {x}" for k, x in r["versions"].items())
        lines.append(f"  {name:<12} {len(r['gpus']):>4} "
                     f"{'-' if free is None else f'{free / GiB:.1f}':>12} "
                     f"{_rate(r['write_bytes_s']):>10}  {v}")
    for i, name in names.items():
        r = reports.get(i)
        if r is not None:
            lines += _node_details(name, r)
    for name, reasons in sorted(bad.items()):
        lines += [f"  FAILED {name}: {reason}" for reason in reasons]
    if net:
        lines.append(f"all-reduce ({net['backend']}, {len(names)} node(s), "
                     f"{net['bytes'] // 2**20} MiB x {net['iterations']}): bus bandwidth "
                     f"{net['busbw_bytes_s'] / 1e9:.3f} GB/s (algorithm bandwidth "
                     f"{net['algbw_bytes_s'] / 1e9:.3f} GB/s, {net['seconds_each'] * 1e3:.1f} ms each)")
    lines += notes
    return "\n".join(lines) + "\n"


def _node_details(name: str, r: dict) -> list[str]:
    """The node's GPU models (name, compute capability; driver, CUDA) and its optimizer rows."""
    lines = []
    models = collections.Counter((g.get("name", "?"), g.get("capability", "?")) for g in r["gpus"])
    if models:
        kinds = ", ".join(f"{n} x {model} (compute capability {cc})"
                          for (model, cc), n in models.items())
        lines.append(f"  {name:<12} GPUs: {kinds}; driver {r.get('driver') or '?'}, CUDA "
                     f"{r.get('driver_cuda') or '?'} (torch built for {r.get('torch_cuda') or '?'})")
    for c in r.get("checks", []):
        lines.append(f"  {name:<12} {'ok' if c['ok'] else 'FAILED'}  {c['check']}: {c['detail']}")
    return lines


def checkpoint_note(ckpt_bytes: int, reports: Mapping[int, Optional[dict]], grace_s: int) -> str:
    """The planned checkpoint's write time at the slowest node's speed, against grace_s."""
    speeds = [r["write_bytes_s"] for r in reports.values() if r and r["write_bytes_s"]]
    if not speeds:
        return "checkpoint: no write speed measured"
    need = ckpt_bytes / min(speeds)
    text = (f"checkpoint: about {ckpt_bytes / GiB:.2f} GiB, {need:.1f} s at the slowest node's "
            f"{_rate(min(speeds))}; cluster.grace_s is {grace_s} s")
    if need > grace_s:
        text += (f"\nWARNING: a checkpoint takes longer than cluster.grace_s: at preemption or the "
                 f"time limit the job would be killed while saving; raise cluster.grace_s above "
                 f"{int(need) + 1} s")
    return text


# ------------------------------------------------------------------ ftlaunch preflight
def _where(env: Mapping[str, str]) -> tuple[int, int, str, str, int]:
    """(node index, nodes, node name, store host, store port) from Slurm's and the job's variables."""
    node_id = int(env.get("SLURM_NODEID", "0"))
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    name = env.get("SLURMD_NODENAME") or socket.gethostname()
    host = env.get("MASTER_ADDR") or dist_env.DEFAULT_ADDR
    port = env.get("MASTER_PORT")
    port_n = dist_env.preflight_port(int(port)) if port else dist_env.free_port()
    return node_id, nnodes, name, host, port_n


def _collect(store, nnodes: int, deadline: float) -> dict[int, Optional[dict]]:
    reports: dict[int, Optional[dict]] = {i: None for i in range(nnodes)}
    while True:
        for i in range(nnodes):
            if reports[i] is None and store.check([f"report/{i}"]):
                reports[i] = json.loads(store.get(f"report/{i}"))
        if all(r is not None for r in reports.values()) or time.monotonic() > deadline:
            return reports
        time.sleep(0.1)


@dataclass(frozen=True)
class PreflightCall:
    """What `ftlaunch preflight` was asked: the run's resolved.yaml, and where to write the
    nodes found unfit."""
    run_file: str
    bad_nodes: str | None = None


def main(call: PreflightCall) -> int:
    env = dict(os.environ)
    start = time.monotonic()
    node_id, nnodes, name, host, port = _where(env)
    report, cfg = check_node(call.run_file, env, name)
    if cfg is not None:
        from launcher.cluster.rundir import keep_private
        keep_private(cfg)   # the summary files: output.private
    report["node_id"] = node_id
    for problem in report["problems"]:
        print(f"ftlaunch preflight: {name}: {problem}", file=sys.stderr)
    timeout = cfg.cluster.preflight_timeout_s if cfg is not None else 120
    import datetime

    import torch.distributed as dist
    store = dist.TCPStore(host, port, None, node_id == 0, datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    store.set(f"report/{node_id}", json.dumps(report))
    if node_id != 0:
        try:
            if json.loads(store.get("verdict"))["allreduce"]:
                allreduce(store, node_id, nnodes, timeout)
        except Exception as exc:  # noqa: BLE001 - node 0 decides and reports; this node says what it saw
            print(f"ftlaunch preflight: {name}: no verdict or all-reduce with node 0 within "
                  f"{timeout} s: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"ftlaunch preflight: {name}: {'passed' if not report['problems'] else 'FAILED'}")
        return 0 if not report["problems"] else 1
    return _node0(call, store, report, cfg, nnodes, start, timeout)


def _node0(call: PreflightCall, store, report, cfg, nnodes: int, start: float, timeout: int) -> int:
    reports = _collect(store, nnodes, start + timeout)
    names = {i: (r["node"] if r else f"node index {i}") for i, r in reports.items()}
    if os.environ.get("SLURM_JOB_NODELIST") and nnodes > 1:
        out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                             capture_output=True, text=True, timeout=60)
        hosts = out.stdout.split()
        if len(hosts) == nnodes:   # SLURM_NODEID numbers the nodes in this order
            names = {i: (r["node"] if r else hosts[i]) for i, r in reports.items()}
    notes: list[str] = []
    if os.environ.get("MASTER_PORT", "").isdigit():   # the ports against the ephemeral range
        master = int(os.environ["MASTER_PORT"])
        notes.append(dist_env.port_note({"rendezvous": master,
                                         "preflight store": dist_env.preflight_port(master)}))
    numbers: dict[str, Any] = {}
    if cfg is not None:
        try:
            numbers = plan_numbers(cfg)
        except Exception as exc:  # noqa: BLE001 - the plan is advice here: training decides
            notes.append(f"no memory plan ({type(exc).__name__}: {exc}); GPU memory not checked")
    bad = judge(reports, names, numbers.get("per_gpu"))
    net = None
    store.set("verdict", json.dumps({"allreduce": not bad}))
    if not bad:
        try:
            net = allreduce(store, 0, nnodes, timeout)
        except Exception as exc:  # noqa: BLE001 - reported as the node's verdict
            notes.append(f"all-reduce failed: {type(exc).__name__}: {exc}")
    if numbers.get("checkpoint_bytes") is not None and cfg is not None:
        notes.append(checkpoint_note(numbers["checkpoint_bytes"], reports, cfg.cluster.grace_s))
    text = summary_text(reports, names, bad, net, notes, time.monotonic() - start)
    print(text, end="")
    run_dir = os.path.dirname(os.path.abspath(call.run_file))
    from launcher.common.files import write_atomic
    try:
        write_atomic(os.path.join(run_dir, SUMMARY_TEXT), text)
        write_atomic(os.path.join(run_dir, SUMMARY_JSON), json.dumps(
            {"nodes": {names[i]: r for i, r in reports.items()}, "bad": bad, "allreduce": net,
             "checkpoint_bytes": numbers.get("checkpoint_bytes"), "notes": notes}, indent=1) + "\n")
        if call.bad_nodes and bad:
            write_atomic(call.bad_nodes, "".join(
                n + " " + "; ".join(r).replace("\n", " ") + "\n" for n, r in sorted(bad.items())))
    except OSError as exc:
        print(f"ftlaunch preflight: cannot write the summary in {run_dir}: {exc}", file=sys.stderr)
        return 1
    failed = bool(bad) or any(n.startswith("all-reduce failed") for n in notes)
    return 1 if failed else layout.EXIT_OK
