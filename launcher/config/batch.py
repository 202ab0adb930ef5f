"""Batch arithmetic: micro_batch_size x grad_accum x ranks = global_batch_size, in one place.

Every caller asks here: `validate` (the rule and its fixes), `ds_config` (train_batch_size and
friends), `summary` (the batch line), `local_run` (whether this machine's ranks divide the
global batch) and the ranks (`train`, the accumulation steps of the loop).
"""
from __future__ import annotations

from launcher.config.schema import RunConfig
from launcher.config.errors import Problem


def derived_accum(global_batch: int, micro: int, world: int) -> int | None:
    """grad_accum that makes micro x grad_accum x world = global_batch, or None if none does."""
    per_step = micro * world
    return None if global_batch % per_step else global_batch // per_step


def dividing_ranks(global_batch: int, micro: int, most: int = 64) -> list[int]:
    """Rank counts up to `most` over which global_batch splits into micro batches of `micro`."""
    return [n for n in range(1, most + 1) if derived_accum(global_batch, micro, n) is not None]


def dp_size(cfg: RunConfig, world_size: int | None = None) -> int:
    """Data-parallel ranks: the world size (default: the cluster's) over train.sequence_parallel
    (the ranks that share each sequence count once in the batch)."""
    return max(1, (world_size or cfg.world_size) // cfg.train.sequence_parallel)


def batch_sizes(cfg: RunConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """(micro batch, grad accum, global batch) for world_size ranks (default: the cluster's),
    of which world_size / train.sequence_parallel are data-parallel.

    grad_accum is derived from global_batch_size when not given; ValueError if it cannot be.
    """
    t = cfg.train
    world = dp_size(cfg, world_size)
    if world_size is None:
        names, ranks = "nodes x gpus_per_node", f"{cfg.cluster.nodes} x {cfg.cluster.gpus_per_node}"
    else:
        names, ranks = "world size", str(world_size)
    if t.sequence_parallel > 1:
        names, ranks = f"({names}) / sequence_parallel", f"{ranks} / {t.sequence_parallel}"
    per_step = t.micro_batch_size * world
    if t.global_batch_size is None:
        accum = t.grad_accum or 1
    elif t.grad_accum is None:
        derived = derived_accum(t.global_batch_size, t.micro_batch_size, world)
        if derived is None:
            raise ValueError(f"global_batch_size {t.global_batch_size} is not a multiple of "
                             f"micro_batch_size x {names} = {t.micro_batch_size} x {ranks} = {per_step}")
        accum = derived
    else:
        accum = t.grad_accum
        if t.global_batch_size != per_step * accum:
            raise ValueError(f"global_batch_size {t.global_batch_size} != micro_batch_size x "
                             f"grad_accum x {names} = {t.micro_batch_size} x {accum} x {ranks} "
                             f"= {per_step * accum}")
    return t.micro_batch_size, accum, per_step * accum


def batch_options(cfg: RunConfig, world: int) -> list[dict[str, int | None]]:
    """Changes to train.* that would make the batch arithmetic work (each one alone)."""
    t = cfg.train
    g, m, a = t.global_batch_size, t.micro_batch_size, t.grad_accum
    assert g is not None
    per = m * world
    out: list[dict[str, int | None]] = []
    if a is None:
        lo = (g // per) * per
        out += [{"global_batch_size": v} for v in (lo, lo + per) if v > 0]
        if g % world == 0:
            q = g // world
            divisors = [d for d in range(1, min(q, 4 * m) + 1) if q % d == 0 and d != m]
            below = [d for d in divisors if d < m]
            above = [d for d in divisors if d > m]
            out += [{"micro_batch_size": d} for d in (below[-1:] + above[:1])]
    else:
        out.append({"global_batch_size": per * a})
        if g % per == 0:
            out.append({"grad_accum": g // per})
        if g % (a * world) == 0:
            out.append({"micro_batch_size": g // (a * world)})
        out.append({"global_batch_size": None})
    return out


def _describe_option(opt: dict[str, int | None], cfg: RunConfig, world: int) -> str:
    t = cfg.train
    (name, value), = opt.items()
    if value is None:
        return f"remove {name} (it is then micro x grad_accum x ranks)"
    if name == "global_batch_size" and t.grad_accum is None:
        return f"global_batch_size: {value} (grad_accum {value // (t.micro_batch_size * world)})"
    if name == "micro_batch_size" and t.grad_accum is None:
        assert t.global_batch_size is not None
        return f"micro_batch_size: {value} (grad_accum {t.global_batch_size // (value * world)})"
    return f"{name}: {value}"


def batch_problem(cfg: RunConfig, world_size: int | None = None) -> Problem | None:
    """The batch-arithmetic problem for world_size ranks (default: the cluster's), with the
    numbers that would work, or None."""
    try:
        batch_sizes(cfg, world_size)
    except ValueError as exc:
        world = dp_size(cfg, world_size)
        assert cfg.train.global_batch_size is not None
        note = ""
        if cfg.train.grad_accum is None and cfg.train.global_batch_size % world:
            kind = " data-parallel" if cfg.train.sequence_parallel > 1 else ""
            note = f" (a global batch must be a multiple of the {world}{kind} ranks)"
        options = [_describe_option(o, cfg, world) for o in batch_options(cfg, world)]
        return Problem("train.global_batch_size", f"{exc}{note}", "use one of: " + "; ".join(options))
    return None


def local_batch_problem(cfg: RunConfig, nproc: int) -> Problem | None:
    """`ftlaunch run` keeps global_batch_size and derives grad_accum for this machine's nproc
    ranks: the problem when they do not divide it (with the rank counts that do), or None."""
    t = cfg.train
    if (t.global_batch_size is None
            or derived_accum(t.global_batch_size, t.micro_batch_size, nproc) is not None):
        return None
    options = dividing_ranks(t.global_batch_size, t.micro_batch_size)
    return Problem("train.global_batch_size", f"{t.global_batch_size} is not a multiple of "
                   f"micro_batch_size x ranks = {t.micro_batch_size} x {nproc} on this machine",
                   f"use --nproc {' or '.join(map(str, options[-3:]))}, or override "
                   "train.global_batch_size for the local run")
