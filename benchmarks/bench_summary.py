"""The benchmark summary in plain Python (no torch): paired ratios, their spread, the target table
and its verdicts, the text tables.

How the figures are made. One benchmark test times all providers of a case (every memory layout,
every provider) in interleaved rounds: each round runs every provider once, in an order rotated by
one place per round, so round r of eager and round r of a fused provider ran seconds apart under
the same machine load. A ratio is taken per round, pair by pair: speed = eager time / provider
time, memory = provider peak / eager peak, always against eager in the same memory layout as the
case (the "best vs best eager layout" column alone compares with the faster eager layout). Each
ratio is reported as its median and interquartile range, "median [q1–q3]". A target is `met` when
the whole IQR lies on its side of the threshold, `MISSED` when the whole IQR lies on the other
side, and `inconclusive` when the IQR straddles it.
"""
import functools
import operator
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence

PROVIDER_ORDER = ("eager", "compiled")


class Spread(NamedTuple):
    median: float
    q1: float
    q3: float


class Target(NamedTuple):
    group: str
    mode: str
    metric: str  # a key of METRICS
    comparison: str  # a key of COMPARISONS
    threshold: float
    device: str  # "cuda" or "cpu"
    case: str = ""  # only cases whose name starts with this
    provider: str = ""  # judge this provider; default: the fastest fused provider of the row


# The stated targets, judged for the fastest fused provider of each case and layout against eager
# (or compiled) in the same layout. The op cases have none for speed on the CPU: eager's matrix
# products alone take most of their time there (op_bounds prints each case's ratio beside that
# bound, without a verdict); the models' steps, memory and inference are the CPU's goals.
TARGETS = (
    Target("aggregation node", "fwd+bwd", "speed vs eager", ">=", 2.0, "cuda"),
    Target("aggregation node", "fwd+bwd", "speed vs compiled", ">=", 1.5, "cuda"),
    Target("aggregation node", "fwd+bwd", "copy bandwidth", ">=", 0.6, "cuda"),
    Target("IDA-Up step", "fwd+bwd", "speed vs eager", ">=", 2.0, "cuda"),
    Target("training step", "train step", "speed vs eager", ">=", 1.2, "cuda", case="dla34 "),
    Target("training step", "train step", "speed vs compiled", ">=", 1.05, "cuda", case="dla34 "),
    Target("training step", "train step", "memory vs eager", "<=", 0.75, "cuda", case="dla34 "),
    Target("aggregation node", "fwd+bwd", "memory vs eager", "<=", 1.0, "cpu"),
    Target("IDA-Up step", "fwd+bwd", "memory vs eager", "<=", 1.0, "cpu"),
    Target("training step", "train step", "speed vs eager", ">=", 1.0, "cpu"),
    Target("training step", "train step", "memory vs eager", "<=", 1.0, "cpu"),
    # bytes saved for backward: the default mode, and the lean one (memory_efficient=True)
    Target("training step", "train step", "saved vs eager", "<=", 0.95, "cpu", provider="fused:auto"),
    Target("training step", "train step", "saved vs eager", "<=", 0.85, "cpu", "dla34 ", "fused:cpu+lean"),
    Target("training step", "train step", "saved vs eager", "<=", 0.88, "cpu", "dla34up ", "fused:cpu+lean"),
    Target("training step", "train step", "saved vs eager", "<=", 0.91, "cpu", "centernet_dla34 ", "fused:cpu+lean"),
    Target("training step", "train step", "speed vs compiled", ">=", 1.0, "cpu", provider="fused:auto+compiled"),
    Target("inference", "eval fwd", "speed vs eager", ">=", 1.05, "cpu"),
)

COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles, interpolating linearly between order statistics."""
    s = sorted(values)
    if not s:
        raise ValueError("spread of no values")

    def quantile(p):
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return Spread(quantile(0.5), quantile(0.25), quantile(0.75))


def paired(numerators: Sequence[float], denominators: Sequence[float]) -> Optional[Spread]:
    """Spread of the per-round ratios numerators[r] / denominators[r] (rounds with a zero
    denominator left out; None when none is left)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}: not paired")
    ratios = [a / b for a, b in zip(numerators, denominators) if b > 0]
    return spread(ratios) if ratios else None


def verdict(s: Spread, comparison: str, threshold: float) -> str:
    """'met' / 'MISSED' when the whole interquartile range is on one side of the threshold."""
    ok = COMPARISONS[comparison]
    if ok(s.q1, threshold) and ok(s.q3, threshold):
        return "met"
    if not ok(s.q1, threshold) and not ok(s.q3, threshold):
        return "MISSED"
    return "inconclusive"


def fmt_ratio(s: Optional[Spread], digits: int = 2) -> str:
    return "-" if s is None else f"{s.median:.{digits}f}x [{s.q1:.{digits}f}–{s.q3:.{digits}f}]"


def fmt_percent(s: Optional[Spread]) -> str:
    return "-" if s is None else f"{s.median * 100:.0f}% [{s.q1 * 100:.0f}–{s.q3 * 100:.0f}]"


def speed(row: Dict, provider: str, baseline: str = "eager") -> Optional[Spread]:
    if provider not in row or baseline not in row:
        return None
    return paired(row[baseline]["times"], row[provider]["times"])


def memory(row: Dict, provider: str) -> Optional[Spread]:
    mine, eager = row.get(provider, {}).get("memory"), row.get("eager", {}).get("memory")
    return paired(mine, eager) if mine and eager else None


def saved_ratio(row: Dict, provider: str) -> Optional[Spread]:
    """Bytes saved for backward against eager's (measured once: no spread)."""
    mine, eager = row.get(provider, {}).get("saved"), row.get("eager", {}).get("saved")
    if mine is None or not eager:
        return None
    return Spread(mine / eager, mine / eager, mine / eager)


def bandwidth(row: Dict, provider: str, copy_bandwidth: Optional[float]) -> Optional[Spread]:
    r = row.get(provider)
    if not r or not r.get("min_bytes") or not copy_bandwidth:
        return None
    return spread([r["min_bytes"] / t / copy_bandwidth for t in r["times"]])


# metric: (its spread for a row and provider, given the copy bandwidth; format; phrase)
METRICS = {
    "speed vs eager": (lambda row, p, bw: speed(row, p), fmt_ratio, "{p} {v} eager's speed"),
    "speed vs compiled": (lambda row, p, bw: speed(row, p, "compiled"), fmt_ratio, "{p} {v} compiled's speed"),
    "memory vs eager": (lambda row, p, bw: memory(row, p), fmt_ratio, "{p} peak memory {v} eager's"),
    "saved vs eager": (lambda row, p, bw: saved_ratio(row, p), fmt_ratio, "{p} saves {v} eager's bytes for backward"),
    "copy bandwidth": (lambda row, p, bw: bandwidth(row, p, bw), fmt_percent, "{p} {v} of copy bandwidth"),
}


def best_fused(row: Dict) -> Optional[str]:
    """The fused provider with the highest median speed-up over same-layout eager."""
    speeds = {p: speed(row, p) for p in row if p.startswith("fused")}
    speeds = {p: s for p, s in speeds.items() if s}
    return max(speeds, key=lambda p: speeds[p].median) if speeds else None


def median_time(row: Dict, provider: str) -> float:
    return spread(row[provider]["times"]).median


def vs_best_eager_layout(layouts: Dict[str, Dict], layout: str) -> Optional[Spread]:
    """The best fused provider of `layout` against eager in the case's faster layout."""
    fused = best_fused(layouts[layout])
    with_eager = [row for row in layouts.values() if "eager" in row]
    if not fused or not with_eager:
        return None
    fastest = min(with_eager, key=lambda row: median_time(row, "eager"))
    return paired(fastest["eager"]["times"], layouts[layout][fused]["times"])


def grouped(results: List[Dict]) -> Dict:
    """{(group, mode): {case: {layout: {provider: record}}}}, in the order measured."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in results:
        out[(r["group"], r["mode"])][r["case"]][r["layout"]][r["provider"]] = r
    return out


def _target_line(target: Target, where: str, row: Dict, copy_bandwidth: Optional[float]) -> Optional[str]:
    fused = (target.provider if target.provider in row else None) if target.provider else best_fused(row)
    compute, fmt, phrase = METRICS[target.metric]
    s = compute(row, fused, copy_bandwidth) if fused else None
    if s is None:
        return None
    goal = f"{target.threshold * 100:g}%" if fmt is fmt_percent else f"{target.threshold:g}x"
    if fmt is fmt_ratio and any(round(v, 2) == round(target.threshold, 2) for v in s):
        fmt = functools.partial(fmt_ratio, digits=3)  # (a MISSED 1.00x against 1x would read as a contradiction)
    return (f"  {verdict(s, target.comparison, target.threshold):12s}  {where}: {phrase.format(p=fused, v=fmt(s))} "
            f"(target {target.comparison} {goal})")


def check_targets(results: List[Dict], device: str, copy_bandwidth: Optional[float] = None) -> List[str]:
    """One line per target that a measured case and layout can show: verdict, median and IQR."""
    lines = []
    for (group, mode), cases in grouped(results).items():
        for target in TARGETS:
            if (target.device, target.group, target.mode) != (device, group, mode):
                continue
            for case, layouts in cases.items():
                for layout, row in layouts.items() if case.startswith(target.case) else ():
                    lines.append(_target_line(target, f"{group} {mode}, {case}, {layout}", row, copy_bandwidth))
    return [line for line in lines if line]


def _providers(cases: Dict) -> List[str]:
    names = {p for layouts in cases.values() for row in layouts.values() for p in row}
    return sorted(names, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p))


def _table(title: str, header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [title, fmt(header)] + [fmt(r) for r in rows]


def _rows(cases: Dict, providers: List[str], cell, extra=None) -> List[List[str]]:
    rows = []
    for case, layouts in cases.items():
        for layout, row in layouts.items():
            rows.append([case, layout] + [cell(row, p) for p in providers]
                        + ([extra(layouts, layout)] if extra else []))
    return rows


def _mib(row: Dict, key: str) -> str:
    value = row.get("eager", {}).get(key)
    if value is None:
        return "-"
    return f"{(spread(value).median if isinstance(value, list) else value) / 2**20:.1f} MiB"


def tables(group: str, mode: str, cases: Dict, memory_kind: str, copy_bandwidth: Optional[float]) -> List[str]:
    providers = _providers(cases)
    others = [p for p in providers if p != "eager"]
    records = [r for layouts in cases.values() for row in layouts.values() for r in row.values()]
    head = ["case", "layout", "eager"] + others

    def time_cell(row, p):
        if p != "eager":
            return fmt_ratio(speed(row, p))
        return f"{median_time(row, 'eager') * 1e3:.3f} ms" if "eager" in row else "-"
    lines = _table(f"{group}, {mode}: eager ms; others: eager time / provider time, same layout, median [q1–q3] "
                   "(higher is faster)", head + ["best vs best eager layout"],
                   _rows(cases, ["eager"] + others, time_cell,
                         lambda layouts, layout: fmt_ratio(vs_best_eager_layout(layouts, layout))))
    if any(r.get("memory") for r in records):
        lines += _table(f"{group}, {mode}: {memory_kind}, others as a ratio of same-layout eager's, median [q1–q3] "
                        "(lower is leaner)", head,
                        _rows(cases, ["eager"] + others,
                              lambda row, p: _mib(row, "memory") if p == "eager" else fmt_ratio(memory(row, p))))
    if any(r.get("saved") for r in records):
        def saved(row, p):
            if p == "eager":
                return _mib(row, "saved")
            mine, eager = row.get(p, {}).get("saved"), row.get("eager", {}).get("saved")
            return "-" if mine is None or not eager else f"{mine / eager:.2f}x"
        lines += _table(f"{group}, {mode}: bytes saved for backward, others as a ratio of same-layout eager's",
                        head, _rows(cases, ["eager"] + others, saved))
    if copy_bandwidth and any(r.get("min_bytes") for r in records):
        lines += _table(f"{group}, {mode}: fewest bytes / time, as % of device copy bandwidth "
                        f"({copy_bandwidth / 1e9:.0f} GB/s), median [q1–q3]", ["case", "layout"] + providers,
                        _rows(cases, providers, lambda row, p: fmt_percent(bandwidth(row, p, copy_bandwidth))))
    return lines


def shares(results: List[Dict]) -> List[str]:
    """How much of an eager model step the fused parts take, and so how far fusing them can move
    the step: for each eager step that lists its parts (op cases and calls), the sum of the op
    benchmarks' eager fwd+bwd medians over the parts, as a share of the step's median (same
    layout); the step's speed-up if the parts took no time, 1 / (1 - share); and the speed-up the
    op benchmarks predict, the parts taking the best fused provider's median instead."""
    ops = defaultdict(dict)
    for r in results:
        if r["mode"] == "fwd+bwd":
            ops[r["group"], r["case"], r["layout"]][r["provider"]] = r
    rows = []
    for r in results:
        if r["group"] != "training step" or r["provider"] != "eager" or not r.get("parts"):
            continue
        step = median_time({"eager": r}, "eager")
        eager_parts = fused_parts = 0.0
        for group, case, calls in r["parts"]:
            row = ops.get((group, case, r["layout"]), {})
            fused = best_fused(row)
            if "eager" not in row or not fused:
                break
            eager_parts += calls * median_time(row, "eager")
            fused_parts += calls * median_time(row, fused)
        else:
            share = eager_parts / step
            rows.append([r["case"], r["layout"], f"{step * 1e3:.1f} ms", f"{share * 100:.0f}%",
                         f"{1 / (1 - share):.2f}x" if share < 1 else "-",
                         f"{step / (step - eager_parts + fused_parts):.2f}x"])
    if not rows:
        return []
    return [""] + _table("training step: the fused parts (aggregation nodes, IDA-Up steps) in an eager step, from the "
                         "op benchmarks' fwd+bwd medians at the same shapes and layout",
                         ["case", "layout", "eager step", "parts' share", "step speed-up if parts were free",
                          "step speed-up predicted from op medians"], rows)


def launch_table(launches: List[Dict]) -> List[str]:
    """Kernel launches per forward + backward of each op case and provider: Triton launches and
    kernel-launching ATen ops (counted at dispatch, under the interpreter on the CPU), or the CUDA
    kernels the profiler saw on a GPU."""
    if not launches:
        return []
    rows = [[r["case"], r["provider"], str(r["triton"] + r["aten"]), str(r["triton"]), str(r["aten"]), r["counted"]]
            for r in launches]
    return [""] + _table("kernel launches per forward + backward (training mode)",
                         ["case", "provider", "total", "Triton", "ATen / other", "counted by"], rows)


def roofline_table(rows: List[Dict], results: List[Dict]) -> List[str]:
    """benchmarks/roofline.py's predictions per op case (bf16, channels_last, batch 64, 224 px),
    the measured launch count beside the predicted one, and, where the op benchmarks ran at those
    shapes (a GPU), the measured fwd+bwd ratio of fused:triton beside the predicted ones."""
    if not rows:
        return []
    measured = grouped(results).get
    table = []
    for r in rows:
        cases = (measured((r["group"], "fwd+bwd")) or {}).get(r["case"], {})
        row = cases.get("channels_last", {})
        table.append([r["case"], f"{r['eager_mb']:.0f}", f"{r['triton_mb']:.0f}",
                      f"{r['eager_gflop']:.1f} / {r['triton_gflop']:.1f}",
                      f"{r['eager_launches']} / {r['triton_launches']} ({r['triton_kernels']} Triton)",
                      str(r["measured_launches"]), f"{r['bytes_ratio']:.2f}x", f"{r['roofline_ratio']:.2f}x",
                      f"{r['launch_ratio']:.2f}x", fmt_ratio(speed(row, "fused:triton"))])
    return [""] + _table(
        "roofline model, fwd+bwd, bf16 channels_last at batch 64 / 224 px (benchmarks/roofline.py): HBM bytes "
        "derived from each kernel's loads and stores, eager / fused Triton path; ratios are eager / fused",
        ["case", "eager MB", "Triton MB", "GFLOP e / T", "launches e / T (predicted)", "T launches measured",
         "at equal bandwidth", "roofline", "+4 us/launch", "measured (GPU)"], table)


# The provider that times eager's matrix products alone (benchmarks/test_ops.py).
GEMMS = "eager GEMMs only"


def op_bounds(results: List[Dict]) -> List[str]:
    """Per op case and layout with a GEMM-only row: the fastest fused provider's speed against eager
    beside eager time / the time of eager's products alone, the most a fusion that runs those
    products at the same speed can reach. No verdict."""
    lines = []
    for (group, mode), cases in grouped(results).items():
        for case, layouts in cases.items():
            for layout, row in layouts.items():
                fused, bound = best_fused(row), speed(row, GEMMS)
                if fused and bound:
                    lines.append(f"  {group} {mode}, {case}, {layout}: {fused} {fmt_ratio(speed(row, fused))}; "
                                 f"eager's GEMMs alone {fmt_ratio(bound)}")
    if not lines:
        return []
    return ["", "op cases, fastest fused provider vs eager beside the bound of eager's GEMMs alone (no verdict):"] + lines


def summary(results: List[Dict], device: str, memory_kind: str, copy_bandwidth: Optional[float] = None) -> List[str]:
    """The tables of every (group, mode) measured, the fused parts' share of the model steps, the op
    cases beside their GEMM-only bound, then the target verdicts."""
    lines = []
    for (group, mode), cases in grouped(results).items():
        lines += [""] + tables(group, mode, cases, memory_kind, copy_bandwidth)
    lines += shares(results) + op_bounds(results)
    checks = check_targets(results, device, copy_bandwidth)
    return lines + (["", "targets (met / MISSED only when the whole IQR is on one side):"] + checks if checks else [])
