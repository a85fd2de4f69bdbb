"""Summary of a benchmark run: a table of ratios against eager measured in the same run, the
stated targets checked, all figures as JSON and a PNG chart (folder: $DLA_BENCH_OUT or
runs/bench)."""
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))

import bench_utils as bu  # noqa: E402

OUT = os.environ.get("DLA_BENCH_OUT", os.path.join("runs", "bench"))


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _table(rows, providers, value, title):
    lines = [title]
    width = max([len(r) for r in rows] + [10])
    lines.append(f"{'case':{width}s}" + "".join(f"{p:>14s}" for p in providers))
    for case, by_provider in rows.items():
        lines.append(f"{case:{width}s}" + "".join(f"{value(by_provider, p):>14s}" for p in providers))
    return lines


def summarize(results):
    """Text tables and target checks from the recorded results."""
    lines, checks = [], []
    env = bu.environment()
    lines.append("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    groups = defaultdict(lambda: defaultdict(dict))
    for r in results:
        groups[(r["group"], r["mode"])][r["case"]][r["provider"]] = r
    for (group, mode), rows in groups.items():
        providers = sorted({p for by in rows.values() for p in by}, key=lambda p: (p != "eager", p))

        def speed(by, p):
            if p not in by or "eager" not in by:
                return "-"
            if p == "eager":
                return f"{by[p]['seconds'] * 1e3:.3f} ms"
            return _fmt_ratio(by["eager"]["seconds"] / by[p]["seconds"])
        lines += [""] + _table(rows, providers, speed,
                               f"{group}, {mode}: eager time, others as speed-up over eager (higher is faster)")
        if any(r.get("memory") for by in rows.values() for r in by.values()):
            def mem(by, p):
                if p not in by or not by[p].get("memory") or not by.get("eager", {}).get("memory"):
                    return "-"
                if p == "eager":
                    return f"{by[p]['memory'] / 2**20:.1f} MiB"
                return _fmt_ratio(by[p]["memory"] / by["eager"]["memory"])
            kind = "peak allocated" if bu.GPU else "peak RSS growth"
            lines += _table(rows, providers, mem, f"{group}, {mode}: {kind}, others as a ratio of eager's "
                                                  "(lower is leaner)")
        if any(r.get("saved") for by in rows.values() for r in by.values()):
            def sav(by, p):
                if p not in by or by[p].get("saved") is None or not by.get("eager", {}).get("saved"):
                    return "-"
                if p == "eager":
                    return f"{by[p]['saved'] / 2**20:.1f} MiB"
                return _fmt_ratio(by[p]["saved"] / by["eager"]["saved"])
            lines += _table(rows, providers, sav, f"{group}, {mode}: bytes saved for backward, as a ratio of eager's")
        if bu.GPU and any(r.get("min_bytes") for by in rows.values() for r in by.values()):
            bw = bu.copy_bandwidth()

            def roof(by, p):
                r = by.get(p)
                if not r or not r.get("min_bytes"):
                    return "-"
                return f"{r['min_bytes'] / r['seconds'] / bw * 100:.0f}%"
            lines += _table(rows, providers, roof, f"{group}, {mode}: fewest bytes / time, as % of device copy "
                                                   f"bandwidth ({bw / 1e9:.0f} GB/s)")
        checks += _targets(group, mode, rows)
    if checks:
        lines += ["", "targets:"] + [f"  {'met   ' if ok else 'MISSED'}  {text}" for ok, text in checks]
    return lines


def _best_fused(by):
    fused = {p: r for p, r in by.items() if p.startswith("fused")}
    return min(fused.items(), key=lambda kv: kv[1]["seconds"]) if fused else (None, None)


def _targets(group, mode, rows):
    """The targets of the benchmark issue that this (group, mode) can show."""
    out = []
    for case, by in rows.items():
        name, best = _best_fused(by)
        eager = by.get("eager")
        if not best or not eager:
            continue
        speedup = eager["seconds"] / best["seconds"]
        if bu.GPU:
            if group == "aggregation node" and mode == "fwd+bwd":
                out.append((speedup >= 2, f"{case}: aggregation fwd+bwd {speedup:.2f}x eager (target 2x, {name})"))
                if "compiled" in by:
                    s = by["compiled"]["seconds"] / best["seconds"]
                    out.append((s >= 1.5, f"{case}: aggregation fwd+bwd {s:.2f}x compiled (target 1.5x)"))
                if best.get("min_bytes"):
                    frac = best["min_bytes"] / best["seconds"] / bu.copy_bandwidth()
                    out.append((frac >= 0.6, f"{case}: {frac * 100:.0f}% of copy bandwidth (target 60%)"))
            elif group == "IDA-Up step" and mode == "fwd+bwd":
                out.append((speedup >= 2, f"{case}: IDA-Up fwd+bwd {speedup:.2f}x eager (target 2x, {name})"))
            elif group == "training step" and case.startswith("dla34 "):
                out.append((speedup >= 1.2, f"{case}: {speedup:.2f}x eager images/s (target 1.2x, {name})"))
                if "compiled" in by:
                    s = by["compiled"]["seconds"] / best["seconds"]
                    out.append((s >= 1.05, f"{case}: {s:.2f}x compiled eager (target 1.05x)"))
                if best.get("memory") and eager.get("memory"):
                    m = best["memory"] / eager["memory"]
                    out.append((m <= 0.75, f"{case}: peak memory {m:.2f}x eager (target <= 0.75x)"))
        elif mode in ("fwd+bwd", "train step"):
            out.append((speedup >= 1.0, f"{case}: {group} {mode} {speedup:.2f}x eager (target: no slower, {name})"))
            if best.get("memory") and eager.get("memory"):
                m = best["memory"] / eager["memory"]
                out.append((m < 1.0, f"{case}: {group} peak memory {m:.2f}x eager (target: lower)"))
    return out


def _chart(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = defaultdict(dict)
    for r in results:
        if r["mode"] in ("fwd+bwd", "train step"):
            cases[f"{r['group']}: {r['case']}"][r["provider"]] = r["seconds"]
    cases = {k: v for k, v in cases.items() if "eager" in v}
    if not cases:
        return
    providers = sorted({p for v in cases.values() for p in v if p != "eager"})
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(cases) * max(1, len(providers)) + 1.5))
    labels = list(cases)
    for i, p in enumerate(providers):
        ax.barh([j * (len(providers) + 1) + i for j in range(len(labels))],
                [cases[c]["eager"] / cases[c][p] if p in cases[c] else 0 for c in labels], label=p)
    ax.set_yticks([j * (len(providers) + 1) + (len(providers) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up over eager, forward+backward / training step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_results():
    """results.json and summary.txt from what has been measured so far; the summary's lines."""
    os.makedirs(OUT, exist_ok=True)
    lines = summarize(bu.RESULTS)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"environment": bu.environment(), "results": bu.RESULTS}, f, indent=1)
    with open(os.path.join(OUT, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


_written = [0]


def pytest_runtest_logfinish(nodeid, location):
    """Rewrite the files after every benchmark that recorded something, so that a run stopped
    part-way (a time limit, a crash) still leaves what it measured."""
    if len(bu.RESULTS) > _written[0]:
        _written[0] = len(bu.RESULTS)
        _write_results()


def pytest_terminal_summary(terminalreporter):
    if not bu.RESULTS:
        return
    lines = _write_results()
    _chart(bu.RESULTS, os.path.join(OUT, "chart.png"))
    terminalreporter.write_sep("=", "dla_fused benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(figures: {OUT}/results.json, {OUT}/summary.txt, {OUT}/chart.png)")
