"""The benchmark summary's statistics and verdicts (benchmarks/bench_summary.py), on made-up figures."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import bench_summary as bs  # noqa: E402


def _record(case, layout, provider, times, memory=None, group="aggregation node", mode="fwd+bwd"):
    return dict(group=group, case=case, layout=layout, mode=mode, provider=provider, times=times, memory=memory,
                saved=None, min_bytes=None, images=None)


def test_spread_interpolates_quartiles():
    assert bs.spread([5, 1, 4, 2, 3]) == (3, 2, 4)
    assert bs.spread([4, 1, 3, 2]) == (2.5, 1.75, 3.25)
    assert bs.spread([7]) == (7, 7, 7)
    with pytest.raises(ValueError):
        bs.spread([])


def test_ratios_are_taken_per_round():
    # the load changed from round to round, but each pair ran under the same load
    eager, fused = [1, 2, 3, 4, 5], [0.5, 1, 1.5, 2, 2.5]
    assert bs.paired(eager, fused) == (2, 2, 2)
    assert bs.paired([1, 2], [0, 1]) == (2, 2, 2)  # a zero denominator is left out
    assert bs.paired([1], [0]) is None
    with pytest.raises(ValueError):
        bs.paired([1, 2], [1])


@pytest.mark.parametrize("s, comparison, threshold, expected", [
    (bs.Spread(2.2, 2.1, 2.3), ">=", 2, "met"),
    (bs.Spread(2.0, 2.0, 2.3), ">=", 2, "met"),
    (bs.Spread(1.8, 1.7, 1.9), ">=", 2, "MISSED"),
    (bs.Spread(2.1, 1.9, 2.3), ">=", 2, "inconclusive"),
    (bs.Spread(1.9, 1.7, 2.3), ">=", 2, "inconclusive"),
    (bs.Spread(0.9, 0.8, 0.95), "<", 1, "met"),
    (bs.Spread(0.9, 0.8, 1.0), "<", 1, "inconclusive"),
    (bs.Spread(1.0, 1.0, 1.1), "<", 1, "MISSED"),
    (bs.Spread(0.7, 0.6, 0.75), "<=", 0.75, "met"),
])
def test_verdict_needs_the_whole_iqr_on_one_side(s, comparison, threshold, expected):
    assert bs.verdict(s, comparison, threshold) == expected


def test_targets_judge_the_best_fused_provider_against_same_layout_eager():
    results = [
        _record("a", "NCHW", "eager", [2, 2, 2, 2, 2], memory=[10] * 5),
        _record("a", "NCHW", "fused:x", [1, 1, 1, 1, 1], memory=[5] * 5),
        _record("a", "NCHW", "fused:y", [4, 4, 4, 4, 4], memory=[1] * 5),
        # channels_last eager is twice as fast: the same fused times would be no speed-up there
        _record("a", "channels_last", "eager", [1, 1, 1, 1, 1], memory=[10] * 5),
        _record("a", "channels_last", "fused:x", [0.4, 0.6, 0.4, 0.6, 0.5], memory=[9, 11, 9, 11, 10]),
    ]
    speed_nchw, speed_cl = bs.check_targets(results, "cuda")  # (>= 2x eager on a GPU)
    assert speed_nchw.split()[0] == "met" and "NCHW: fused:x 2.000x [2.000–2.000] eager's speed" in speed_nchw
    assert speed_cl.split()[0] == "inconclusive" and "channels_last: fused:x" in speed_cl
    memory_nchw, memory_cl = bs.check_targets(results, "cpu")  # no speed target for an op on the CPU
    assert memory_nchw.split()[0] == "met" and "fused:x peak memory 0.50x" in memory_nchw
    assert memory_cl.split()[0] == "inconclusive"


def test_op_cases_are_printed_beside_their_gemm_bound_without_a_verdict():
    results = [_record("a", "NCHW", "eager", [3, 3, 3]), _record("a", "NCHW", "fused:x", [2, 2, 2]),
               _record("a", "NCHW", bs.GEMMS, [2, 2, 2]), _record("a", "NCHW", "fused:y", [6, 6, 6]),
               _record("b", "NCHW", "eager", [3, 3, 3]), _record("b", "NCHW", "fused:x", [2, 2, 2])]
    title, line = bs.op_bounds(results)[1:]
    assert "GEMMs alone" in title and "no verdict" in title
    assert line == "  aggregation node fwd+bwd, a, NCHW: fused:x 1.50x [1.50–1.50]; eager's GEMMs alone 1.50x [1.50–1.50]"
    assert not any(word in line for word in ("met", "MISSED"))  # case b has no GEMM row: no line
    assert bs.op_bounds(results) == bs.summary(results, "cpu", "peak RSS growth")[-3:]


def test_chart_has_a_panel_per_family_and_stays_readable(tmp_path):
    """chart.png: the five families as panels, ratio axes with 1.0 marked, at most 1600 pixels
    tall for a full CPU run's cases (16 op rows, 18 training-step rows)."""
    pytest.importorskip("matplotlib")
    import bench_chart
    from matplotlib import image
    results = []
    for layout in ("NCHW", "channels_last"):
        for i in range(8):
            results += [_record(f"node {i}", layout, p, t) for p, t in
                        (("eager", [2, 2, 2]), ("fused:cpu", [1, 1.1, 0.9]), (bs.GEMMS, [1.5, 1.5, 1.5]))]
            results += [_record(f"step {i}", layout, p, t, group="IDA-Up step") for p, t in
                        (("eager", [2, 2, 2]), ("fused:cpu", [4, 4, 4]))]
        for i in range(9):
            for p, t in (("eager", [2, 2, 2]), ("fused:cpu", [2.1, 2, 1.9])):
                r = _record(f"net {i}", layout, p, t, group="training step", mode="train step", memory=[10, 10, 10])
                r["saved"] = 100 if p == "eager" else 55
                results.append(r)
        results += [_record("net", layout, p, t, group="inference", mode="eval fwd")
                    for p, t in (("eager", [2, 2, 2]), ("fused:cpu", [1, 1, 1]))]
    assert [len(bench_chart.panel_rows(results, *p[1:])) for p in bench_chart.PANELS] == [16, 16, 18, 2, 18]
    memory = dict(bench_chart.panel_rows(results, *bench_chart.PANELS[4][1:]))
    assert memory["net 0  NCHW"]["fused:cpu saved"].median == 0.55
    path = tmp_path / "chart.png"
    assert bench_chart.chart(results, str(path))
    height, width = image.imread(str(path)).shape[:2]
    assert height <= 1600 and width <= 2000
    assert not bench_chart.chart([], str(tmp_path / "none.png"))


def test_best_vs_best_eager_layout_uses_the_faster_eager():
    layouts = {"NCHW": {"eager": {"times": [4, 4, 4]}, "fused:x": {"times": [1, 1, 1]}},
               "channels_last": {"eager": {"times": [2, 2, 2]}, "fused:x": {"times": [2, 2, 2]}}}
    assert bs.vs_best_eager_layout(layouts, "NCHW") == (2, 2, 2)
    assert bs.vs_best_eager_layout(layouts, "channels_last") == (1, 1, 1)


def test_summary_table_and_target_lines():
    results = [_record("a", lay, p, t, group="training step", mode="train step")
               for lay in ("NCHW", "channels_last")
               for p, t in (("eager", [0.2] * 5), ("compiled", [0.1] * 5), ("fused:x", [0.25] * 5))]
    lines = bs.summary(results, "cpu", "peak RSS growth")
    header = lines[2].split()
    assert header[:5] == ["case", "layout", "eager", "compiled", "fused:x"]
    assert lines[2].endswith("best vs best eager layout")
    assert lines[3].split()[:4] == ["a", "NCHW", "200.000", "ms"]
    assert "2.00x [2.00–2.00]" in lines[3] and lines[3].endswith("0.80x [0.80–0.80]")
    assert [line.split()[0] for line in lines[-2:]] == ["MISSED", "MISSED"]


def test_share_of_the_fused_parts_in_a_model_step():
    """A 100 ms eager step made of 2 calls of a 10 ms op and 1 of a 20 ms op: the parts are 40% of
    it, free parts would make the step 1/0.6 = 1.67x faster, and fused ops at 5 and 40 ms predict
    100 / (100 - 40 + 50) = 0.91x."""
    step = dict(_record("net 8x3x128x128", "NCHW", "eager", [0.1] * 5, group="training step", mode="train step"),
                parts=[["aggregation node", "root", 2], ["IDA-Up step", "up", 1]])
    results = [_record("root", "NCHW", "eager", [0.01] * 5), _record("root", "NCHW", "fused:cpu", [0.005] * 5),
               _record("up", "NCHW", "eager", [0.02] * 5, group="IDA-Up step"),
               _record("up", "NCHW", "fused:cpu", [0.04] * 5, group="IDA-Up step"), step]
    title, header, row = bs.shares(results)[1:]
    assert "100.0 ms" in row and row.split()[-3:] == ["40%", "1.67x", "0.91x"]
    # a part without its op benchmark (other sizes, a stopped run): no row rather than a wrong share
    assert bs.shares(results[2:]) == []


def test_saved_bytes_targets_judge_the_named_provider():
    """A target naming a provider judges that one (the default mode, or the lean mode), not the
    fastest; saved bytes are one measurement, so the verdict is met or MISSED, never inconclusive."""
    def step(provider, saved, times):
        r = _record("dla34 8x3x128x128", "NCHW", provider, times, group="training step", mode="train step")
        r["saved"] = saved
        return r
    results = [step("eager", 100, [1.0] * 3), step("fused:auto", 96, [1.0] * 3),
               step("fused:cpu+lean", 84, [2.0] * 3), step("fused:cpu", 90, [0.5] * 3)]
    lines = bs.check_targets(results, "cpu")
    saved = [line for line in lines if "bytes for backward" in line]
    assert any("MISSED" in line and "fused:auto saves 0.96x" in line and "<= 0.95x" in line for line in saved), saved
    assert any("met" in line and "fused:cpu+lean saves 0.84x" in line and "<= 0.85x" in line for line in saved)
    assert len(saved) == 2  # the dla34up and CenterNet lean targets match no case here
    speed = [line for line in lines if "eager's speed" in line]
    assert len(speed) == 1 and "fused:cpu 2.00x" in speed[0]  # the fastest fused provider


class _Clock:
    """A stand-in for time.perf_counter that only the timed calls advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def call(self, durations):
        """A function whose i-th call takes durations[i % len] seconds of this clock."""
        calls = []

        def fn():
            self.now += durations[len(calls) % len(durations)]
            calls.append(1)
        return fn


class _Benchmark:
    def pedantic(self, fn, rounds):
        for _ in range(rounds):
            fn()


def test_rounds_stop_once_every_ratio_is_narrow(monkeypatch):
    import bench_utils as bu  # (providers that are not fused select the default backend, auto)
    clock = _Clock()
    monkeypatch.setattr(bu.time, "perf_counter", clock)
    steady = {("NCHW", "eager"): clock.call([2.0]), ("NCHW", "compiled"): clock.call([1.0])}
    times = bu.interleaved(_Benchmark(), steady, 1)  # (the first call of each is untimed)
    assert [len(v) for v in times.values()] == [bu.MIN_ROUNDS] * 2 and times["NCHW", "compiled"][0] == 1.0
    # a ratio of 2 one round and 1 the next: wide, so the rounds go on to ROUNDS
    noisy = {("NCHW", "eager"): clock.call([2.0]), ("NCHW", "compiled"): clock.call([1.0, 2.0])}
    assert [len(v) for v in bu.interleaved(_Benchmark(), noisy, 1).values()] == [bu.ROUNDS] * 2
    assert bu.settled({("NCHW", "eager"): [1, 1, 1], ("NCHW", "compiled"): [2, 2, 2]}, True)
    assert not bu.settled({("NCHW", "eager"): [1, 1, 1, 1], ("NCHW", "compiled"): [1, 2, 1, 2]}, True)

    peaks = {"eager": [10], "steady": [5], "noisy": [5, 10]}
    monkeypatch.setattr(bu, "peak_memory", lambda fn: peaks[fn].append(peaks[fn].pop(0)) or peaks[fn][-1])
    memory = bu.interleaved_memory({("NCHW", "eager"): "eager", ("NCHW", "compiled"): "steady"})
    assert [len(v) for v in memory.values()] == [bu.MIN_MEMORY_ROUNDS] * 2
    memory = bu.interleaved_memory({("NCHW", "eager"): "eager", ("NCHW", "compiled"): "noisy"})
    assert [len(v) for v in memory.values()] == [bu.MEMORY_ROUNDS] * 2


def test_a_verdict_near_its_threshold_shows_the_digit_that_decides_it():
    results = [_record("a", "NCHW", "eager", [1, 1, 1], memory=[1000] * 3),
               _record("a", "NCHW", "fused:x", [1, 1, 1], memory=[1003] * 3),
               _record("a", "channels_last", "eager", [1, 1, 1], memory=[1000] * 3),
               _record("a", "channels_last", "fused:x", [1, 1, 1], memory=[800] * 3)]
    near, far = bs.check_targets(results, "cpu")
    assert near.split()[0] == "MISSED" and "peak memory 1.003x [1.003–1.003]" in near
    assert far.split()[0] == "met" and "peak memory 0.80x [0.80–0.80]" in far
