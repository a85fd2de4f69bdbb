"""The benchmark run as one figure (chart.png): a panel per family (aggregation node, IDA-Up step,
training steps, inference, memory), a row per case and layout, a marker per provider at its
median ratio to eager in the same layout with its interquartile range as a bar, and 1.0 (eager)
marked. Matplotlib only (no torch), from the records of bench_utils.record."""
from typing import Dict, List

import bench_summary as bs

# (panel title, groups, mode, what is plotted); a group "training step" also covers its sections
# ("training step, untuned shapes", "training step, other networks").
PANELS = (("aggregation node, forward + backward", ("aggregation node",), "fwd+bwd", "speed"),
          ("IDA-Up step, forward + backward", ("IDA-Up step",), "fwd+bwd", "speed"),
          ("training steps", ("training step",), "train step", "speed"),
          ("inference", ("inference",), "eval fwd", "speed"),
          ("training steps: memory", ("training step",), "train step", "memory"))
LEFT, RIGHT = PANELS[:2], PANELS[2:]  # the figure's two columns
COARSE_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
FINE_TICKS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0)
SPEED_AXIS = "eager time / provider time, same layout (> 1: faster)"
MEMORY_AXIS = "provider / eager, same layout (< 1: leaner)"
COLORS = {"compiled": "#7f7f7f", bs.GEMMS: "#000000", "fused:auto": "#1f77b4", "fused:cpu": "#ff7f0e",
          "fused:cpu+lean": "#2ca02c", "fused:auto+compiled": "#9467bd", "fused:triton": "#d62728",
          "fused:cuda": "#8c564b", "fused:triton+lean": "#e377c2", "fused:cuda+lean": "#bcbd22"}
ROW_INCHES, PANEL_INCHES, LEGEND_INCHES = 0.19, 0.9, 0.7  # per row, per panel (title, axis), legend


def _layout(name: str) -> str:
    return "CL" if name == "channels_last" else name


def panel_rows(results: List[Dict], groups, mode: str, what: str) -> List[tuple]:
    """[(row label, {marker label: (median, q1, q3)})] of one panel, in the order measured. Speed:
    a marker per provider (eager's GEMMs alone too, as the op cases' bound). Memory: a marker per
    fused provider and measure (peak, bytes saved for backward)."""
    rows = []
    for (group, group_mode), cases in bs.grouped(results).items():
        if group_mode != mode or not any(group == g or group.startswith(g + ", ") for g in groups):
            continue
        for case, layouts in cases.items():
            for layout, row in layouts.items():
                markers = {}
                for provider in row:
                    if provider == "eager":
                        continue
                    if what == "speed":
                        s = bs.speed(row, provider)
                        if s:
                            markers[provider] = s
                    elif provider.startswith("fused"):
                        for measure, s in (("peak", bs.memory(row, provider)), ("saved", bs.saved_ratio(row, provider))):
                            if s:
                                markers[f"{provider} {measure}"] = s
                if markers:
                    rows.append((f"{case}  {_layout(layout)}", markers))
    return rows


def chart(results: List[Dict], path: str) -> bool:
    """Write the figure to `path`; False (nothing written) when matplotlib is missing or nothing
    was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = {p: panel_rows(results, *p[1:]) for p in PANELS}
    if not any(panels.values()):
        return False
    heights = [sum(PANEL_INCHES + ROW_INCHES * max(len(panels[p]), 1) for p in column) for column in (LEFT, RIGHT)]
    height = max(heights) + LEGEND_INCHES
    fig = plt.figure(figsize=(18, height), dpi=100)
    columns = fig.add_gridspec(1, 2, wspace=0.62, left=0.19, right=0.99, top=1 - LEGEND_INCHES / height,
                               bottom=0.5 / height)
    for column, spec in zip((LEFT, RIGHT), columns):
        cells = spec.subgridspec(len(column), 1, height_ratios=[PANEL_INCHES + ROW_INCHES * max(len(panels[p]), 1)
                                                                for p in column], hspace=0.35)
        for cell, p in zip(cells, column):
            _panel(fig.add_subplot(cell), p[0], p[3], panels[p])
    _legend(fig, plt, {m.rsplit(" ", 1)[0] if p[3] == "memory" else m
                       for p in PANELS for _, markers in panels[p] for m in markers})
    fig.savefig(path)
    plt.close(fig)
    return True


def _legend(fig, plt, providers) -> None:
    """One legend for every panel, above them: a color per provider, a marker per measure."""
    line = plt.Line2D
    handles = [line([], [], color=COLORS.get(p, "#17becf"), marker="o", ls="none", label=p)
               for p in sorted(providers - {bs.GEMMS})]
    if bs.GEMMS in providers:
        handles.append(line([], [], color=COLORS[bs.GEMMS], marker="x", ls="none",
                            label="eager's GEMMs alone (an op's bound)"))
    handles += [line([], [], color="black", marker="o", ls="none", label="time, or peak memory (bar: IQR)"),
                line([], [], color="black", marker="s", mfc="none", ls="none", label="bytes saved for backward"),
                line([], [], color="black", ls="--", label="eager (1.0)")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)


def _panel(ax, title: str, what: str, rows: List[tuple]) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    if not rows:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])
        return
    labels = sorted({m for _, markers in rows for m in markers}, key=lambda m: (m != bs.GEMMS, m))
    offset = {m: (i - (len(labels) - 1) / 2) * 0.7 / max(len(labels), 1) for i, m in enumerate(labels)}
    for y, (_, markers) in enumerate(rows):
        for m, s in markers.items():
            provider, measure = (m.rsplit(" ", 1) + [""])[:2] if what == "memory" else (m, "")
            style = dict(color=COLORS.get(provider, "#17becf"), ms=4, lw=1,
                         marker="x" if provider == bs.GEMMS else "s" if measure == "saved" else "o",
                         mfc="none" if measure == "saved" else None)
            ax.errorbar([s.median], [y + offset[m]], xerr=[[s.median - s.q1], [s.q3 - s.median]], ls="none",
                        **{k: v for k, v in style.items() if v is not None})
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xscale("log")
    lo = min(min(s.q1 for s in markers.values()) for _, markers in rows)
    hi = max(max(s.q3 for s in markers.values()) for _, markers in rows)
    lo, hi = min(lo, 0.9) / 1.05, max(hi, 1.1) * 1.05
    ax.set_xlim(lo, hi)
    candidates = COARSE_TICKS if hi / lo > 3 else FINE_TICKS
    ticks = [t for t in candidates if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first case on top, as in the tables
    ax.grid(axis="x", lw=0.3)
    ax.set_xlabel(SPEED_AXIS if what == "speed" else MEMORY_AXIS, fontsize=8)
