"""tools/benchmark_distill.py at a tiny size (its parts in qdet/benchmark): both run and
report what they promise."""

import json
import os
import sys

from test_retinanet_qfd import _batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchmark_distill as bench  # noqa: E402

from qdet.benchmark import affinity_cost, distill_overhead  # noqa: E402


def test_loss_part_rows_targets_and_skip():
    args = bench.parse_args(
        ["--sizes", "4", "8", "--channels", "8", "--reps", "1", "--warmup", "0"]
        + ["--max-fa-size", "4"]
    )
    result = affinity_cost.bench_losses("cpu", args, cpu_memory_probe=False)
    small, large = result["rows"]
    assert small["fa_ms"] > 0 and small["ffa_ms"] > 0 and small["fa_note"] is None
    assert small["speedup"] == small["fa_ms"] / small["ffa_ms"]
    assert "max-fa-size" in large["fa_note"] and large["fa_ms"] is None and large["ffa_ms"] > 0
    assert large["speedup"] is None and len(large["ffa_all_ms"]) == 1
    assert {t["target"].split()[0] for t in result["targets"]} == {"FA", "FFA"}
    assert result["machine"]["torch_threads"] >= 1
    assert json.loads(json.dumps(result))["rows"][1]["fa_note"] == large["fa_note"]


def test_cpu_memory_probe_sees_the_affinity_matrices():
    """FA at 64 x 64 forms the student's and the teacher's HW x HW float32 affinities
    (2 x 64 MiB): the fresh process's probe must see at least those bytes, above its
    noise (the blind spot it reports, which must be smaller than what it measures)."""
    size, batch = 64, 1
    affinity_bytes = batch * (size * size) ** 2 * 4
    mem = affinity_cost.cpu_memory("fa", size, batch=batch, channels=4, k=3)
    assert set(mem) == {"peak_bytes", "baseline_gap_bytes"}, mem
    gap = mem["baseline_gap_bytes"] or 0
    assert gap < affinity_bytes and mem["peak_bytes"] + gap >= 2 * affinity_bytes


def test_step_part_measures_a_b_c():
    config = distill_overhead.DEFAULT_CONFIG
    cfg = distill_overhead.step_config(config, ["SOLVER.IMS_PER_BATCH", "2"], "cpu")
    batches = [_batch(seed=1), _batch(seed=2)]
    result = distill_overhead.bench_step(cfg, batches, [_batch(seed=0)], warmup=0, steps=2)
    assert result["terms"] == ["qfd"] and set(result["median_ms"]) == {"a", "b", "c"}
    assert all(len(v) == 2 for v in result["seconds"].values())
    m = result["median_ms"]
    assert all(v > 0 for v in m.values()) and m["b"] > m["c"]  # b runs the teacher too
    # The overhead from the reported seconds, recomputed: (b - a - c) / a of the medians.
    median = {n: sorted(v)[len(v) // 2 - 1 : len(v) // 2 + 1] for n, v in result["seconds"].items()}
    med = {n: sum(v) / len(v) for n, v in median.items()}  # 2 values: their mean
    expected = 100 * (med["b"] - med["a"] - med["c"]) / med["a"]
    assert abs(result["overhead_pct"] - expected) < 1e-9 * max(1.0, abs(expected))
    assert result["target"]["ok"] == (expected < 5) and result["finite_losses"]
    assert m == {n: 1e3 * v for n, v in med.items()}
    assert json.loads(json.dumps(result))["paired_overhead_pct"]["median"] is not None
