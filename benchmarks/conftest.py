"""Summary of a benchmark run (folder: $DLA_BENCH_OUT or runs/bench): results.json and summary.txt
after every test, chart.png at the end.

Each test times every provider of a case, in NCHW and channels_last, in interleaved rounds;
ratios are per round against eager in the same layout (eager time / provider time; provider peak /
eager peak), reported as median [q1–q3]; a target (bench_summary.TARGETS) is met or MISSED only
when the whole interquartile range is on one side of its threshold, else inconclusive. Details in
bench_summary.py."""
import json
import os
import sys
from pathlib import Path

import torch

# Without a GPU the launch counts (test_launches.py) run the Triton kernels in Triton's
# interpreter; it must be chosen before triton is first imported. Timing never uses it: on the
# CPU no timed provider runs Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import bench_chart  # noqa: E402
import bench_summary as bs  # noqa: E402
import bench_utils as bu  # noqa: E402

OUT = os.environ.get("DLA_BENCH_OUT", os.path.join("runs", "bench"))
bu.settle_allocator()


def pytest_collection_modifyitems(items):
    """Op benchmarks before model ones: a time-limited run (gpu_check.sh) covers the op cases
    before the whole-network compilations."""
    models = Path(__file__).with_name("test_models.py")
    items.sort(key=lambda item: item.path == models)


def summarize(results):
    """Environment line, tables and target verdicts of the recorded results."""
    env = bu.environment()
    memory_kind = "peak allocated" if bu.GPU else "peak RSS growth"
    return (["environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
            + bs.summary(results, bu.DEVICE.type, memory_kind, bu.copy_bandwidth()) + bs.launch_table(bu.LAUNCHES)
            + bs.roofline_table(bu.ROOFLINE, results))


def _write_results():
    """results.json and summary.txt from what has been measured so far; the summary's lines."""
    os.makedirs(OUT, exist_ok=True)
    lines = summarize(bu.RESULTS)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"environment": bu.environment(), "results": bu.RESULTS, "launches": bu.LAUNCHES,
                   "roofline": bu.ROOFLINE}, f, indent=1)
    with open(os.path.join(OUT, "summary.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


_written = [0]


def pytest_runtest_logfinish(nodeid, location):
    """Rewrite the files after every benchmark that recorded something, so that a run stopped
    part-way (a time limit, a crash) still leaves what it measured."""
    if len(bu.RESULTS) + len(bu.LAUNCHES) + len(bu.ROOFLINE) > _written[0]:
        _written[0] = len(bu.RESULTS) + len(bu.LAUNCHES) + len(bu.ROOFLINE)
        _write_results()


def pytest_terminal_summary(terminalreporter):
    if not bu.RESULTS and not bu.LAUNCHES and not bu.ROOFLINE:
        return
    lines = _write_results()
    bench_chart.chart(bu.RESULTS, os.path.join(OUT, "chart.png"))
    terminalreporter.write_sep("=", "dla_fused benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(figures: {OUT}/results.json, {OUT}/summary.txt, {OUT}/chart.png)")
