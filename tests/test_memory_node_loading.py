"""How 2 CPU ranks load a sharded checkpoint (20M Llama, bf16, 6 shards) and train, at ZeRO 0-3
and ZeRO-2 with optimizer offload, against the plan's per-node terms (launcher/memory/node.py). The
rank side is bench/plan_vs_measured.py,
the driver bench/node_loading.py (which writes the table in docs/memory.md)."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "node_loading", os.path.join(ROOT, "bench", "node_loading.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.multirank
@pytest.mark.slow
def test_ranks_load_a_sharded_checkpoint_as_the_node_plan_says(tmp_path):
    bench = _bench()
    rows = {r["setting"]: r for r in bench.measure(str(tmp_path), list(bench.SETTINGS), steps=2)}
    ck = rows["z2"]["checkpoint"]
    assert rows["z2"]["shards"] >= 4
    for name, r in rows.items():
        # the node: its ranks' peaks (loading, initialize, 2 steps) against the plan's node peak
        assert abs(r["measured_node"] / r["plan_node"] - 1) < 0.15, (name, r["measured_node"],
                                                                     r["plan_node"])
        if "offload" not in name:  # each rank alone (offloaded states leave the per-rank total)
            for rk in r["ranks"]:
                assert abs(rk["peak"] / r["plan_rank"] - 1) < 0.15, (name, rk["peak"], r["plan_rank"])
        # the model states inside those peaks are the engine's, to the byte
        assert r["plan_terms"] == r["engine"], (name, r["plan_terms"], r["engine"])
        # the plan: each rank's weights and masters at initialize, the shards once per node
        # (page cache), no private copy of the state dict
        assert set(r["plan_load"]) == {"rank_init", "page_cache"}, (name, r["plan_load"])
        assert abs(r["plan_load"]["page_cache"] / ck - 1) < 0.01, (name, r["plan_load"], ck)
    for rank in rows["z2"]["ranks"]:  # ZeRO-2: parameters are views of the mapped shards
        assert rank["load_anon_peak"] < 0.1 * ck, rank
        assert rank["load_file_peak"] <= 1.05 * ck, rank
    r0, r1 = rows["z3"]["ranks"]
    # ZeRO-3: rank 0 alone reads the shards; its private memory is its partition and the module
    # being gathered, as on rank 1 (a second copy of the state dict would add 100% of ck)
    assert r0["load_file_peak"] > 0.85 * ck and r1["load_file_peak"] < 0.05 * ck, (r0, r1)
    assert abs(r0["load_anon_peak"] / r1["load_anon_peak"] - 1) < 0.15, (r0, r1)
    weights = rows["z3"]["weights"]  # the plan's partition per rank: P x 2 B / 2
    assert abs(weights / (ck / 2) - 1) < 0.02
    assert weights <= r0["load_anon_peak"] < weights + 0.25 * ck, (weights, r0)
