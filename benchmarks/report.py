"""Bench output: targets met or missed, a terminal table, PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

P99_TARGET_US = 1000.0
RERANK_P99_TARGET_US = 2000.0
RECALL_TARGET = 0.95
C1_RATIO_TARGET = 1.3
QPS_RATIO_TARGET = 0.7


def _target(
    name: str, value: float | None, target: str, met: bool | None, detail: str = ""
) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met, "detail": detail}


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue-5 target with the measured value and whether it is met (None = not run)."""
    out: list[dict[str, Any]] = []
    for name, value in r.items():
        if isinstance(value, dict) and "error" in value:
            out.append(
                _target(f"section {name} ran", None, "no error", False, value["error"][:200])
            )
    for row in _rows(r.get("selectivity")):
        h = row["server_side"].get("handler", {}).get("Recommend", {})
        p99 = h.get("p99_us", math.nan)
        out.append(
            _target(
                f"Recommend server p99 @ {row['label']}",
                round(p99, 1),
                f"< {P99_TARGET_US:.0f} us",
                bool(p99 < P99_TARGET_US),
                f"{h.get('within_1ms', math.nan):.4f} of requests <= 1 ms",
            )
        )
        out.append(
            _target(
                f"recall@20 @ {row['label']}",
                row["recall_at_20"],
                f">= {RECALL_TARGET}",
                bool(row["recall_at_20"] >= RECALL_TARGET),
            )
        )
    ratios = r.get("ratios", {})
    if "e2e_c1_p50_vs_echo" in ratios:
        v = ratios["e2e_c1_p50_vs_echo"]
        out.append(
            _target(
                "e2e c=1 Recommend p50 / echo p50", v, f"<= {C1_RATIO_TARGET}", v <= C1_RATIO_TARGET
            )
        )
    for k, v in ratios.items():
        if k.startswith("qps_c"):
            cpu = ratios.get(k.replace("qps_", "cpu_per_call_"))
            out.append(
                _target(
                    f"{k.replace('_', ' ')} (per process)",
                    v,
                    f">= {QPS_RATIO_TARGET}",
                    v >= QPS_RATIO_TARGET,
                    f"server CPU per call {cpu:.1f}x the echo's" if cpu is not None else "",
                )
            )
    for s in r.get("scenarios", []):
        if s["name"].endswith("Rerank 500"):
            h = s["server_side"].get("handler", {}).get("Rerank", {})
            p99 = h.get("p99_us", math.nan)
            out.append(
                _target(
                    "Rerank 500 server p99",
                    round(p99, 1),
                    f"< {RERANK_P99_TARGET_US:.0f} us",
                    bool(p99 < RERANK_P99_TARGET_US),
                )
            )
    mem = r.get("memory")
    if mem:
        out.append(
            _target(
                "serving RSS",
                mem["rss_mb"],
                f"<= {mem['bound_mb']} MB (1.5 x data + 300 MB)",
                mem["rss_within_bound"],
                f"{mem['rss_bytes_per_item']} bytes/item, PSS {mem['pss_mb']} MB",
            )
        )
    w = _ok(r.get("workers"))
    if w:
        out.append(
            _target(
                f"QPS with {w['workers']} workers / 1 worker",
                w["speedup"],
                "> 1 (grows with cores)",
                w["speedup"] > 1.0,
                f"PSS {w['memory']['pss_mb']} MB for {w['memory']['processes']} processes",
            )
        )
    rt = _ok(r.get("realtime")) or {}
    rl = _ok(rt.get("reload_under_load"))
    if rl:
        out.append(
            _target(
                "failed requests during 5 reloads under load",
                rl["failed_requests"],
                "0",
                rl["failed_requests"] == 0 and rl["reload_outcomes"].get("OK", 0) == rl["reloads"],
                f"p99 {rl['latency_during_reload']['p99_us']:.0f} us during vs "
                f"{rl['latency_outside_reload']['p99_us']:.0f} us outside",
            )
        )
    for key in ("freshness_one_process", "freshness_two_replicas"):
        f = _ok(rt.get(key))
        if f and "skipped" not in f:
            out.append(
                _target(
                    f"event reflected in next Recommend ({key.split('_', 1)[1].replace('_', ' ')})",
                    f["next_read_reflected"],
                    f"{f['trials']} of {f['trials']}",
                    f["next_read_reflected"] == f["trials"],
                    f"delay p50 {f['delay_ms']['p50']} ms, max {f['delay_ms']['max']} ms",
                )
            )
    return out


def _ok(section: Any) -> dict[str, Any] | None:
    """A section's results, or None if it was skipped or failed."""
    return section if isinstance(section, dict) and "error" not in section else None


def _rows(section: Any) -> list[dict[str, Any]]:
    return section if isinstance(section, list) else []


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:,.{digits}f}"
    return str(x)


def print_report(r: dict[str, Any]) -> None:
    console = Console()
    m = r["machine"]
    console.print(
        f"[bold]endcap bench[/bold]  {r['catalog']['spec']['n_items']:,} items, "
        f"{m['cores']} cores ({m['cpu']}), load avg {m['loadavg_start'][0]:.1f} -> "
        f"{m['loadavg_end'][0]:.1f}, {r['duration_s']} s"
    )
    t = Table(title="Scenarios (latency in us; e2e from intended send time)")
    for col in (
        "scenario",
        "qps",
        "e2e p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "server p50",
        "server p99",
        "server CPU/call",
        "errors",
    ):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    rows = list(r.get("scenarios", [])) + _rows(r.get("selectivity"))
    for side in ("server", "echo"):
        rows += (_ok(r.get("open_loop")) or {}).get(side, [])
    workers = _ok(r.get("workers"))
    if workers:
        rows.append(workers["scenario"])
    for s in rows:
        e = s["e2e"]["latency_us"]
        handler = s["server_side"].get("handler", {})
        h = next(iter(handler.values()), {}) if len(handler) == 1 else handler.get("Recommend", {})
        t.add_row(
            s["name"],
            _fmt(s["e2e"]["achieved_qps"]),
            _fmt(e["p50"]),
            _fmt(e["p90"]),
            _fmt(e["p99"]),
            _fmt(e["p999"]),
            _fmt(e["max"]),
            _fmt(h.get("p50_us")),
            _fmt(h.get("p99_us")),
            _fmt(s["e2e"].get("server_cpu_us_per_call")),
            _fmt(sum(s["e2e"]["errors"].values())) if s["e2e"]["errors"] else "0",
        )
    console.print(t)
    if _rows(r.get("selectivity")):
        st = Table(title="By filter selectivity (Recommend, k=20, c=1)")
        for col in (
            "level",
            "passing",
            "server p50",
            "server p99",
            "<=1ms",
            "recall@20",
            "plans",
            "FAISS floor p50",
            "floor recall",
            "server/floor",
        ):
            st.add_column(col, justify="right")
        for s in r["selectivity"]:
            h = s["server_side"].get("handler", {}).get("Recommend", {})
            st.add_row(
                s["label"],
                _fmt(s["passing_items_mean"]),
                _fmt(h.get("p50_us")),
                _fmt(h.get("p99_us")),
                _fmt(h.get("within_1ms"), 4),
                _fmt(s["recall_at_20"], 3),
                " ".join(f"{k}:{v}" for k, v in s["in_process"]["plans"].items()),
                _fmt(s["index_floor"]["filtered_us"]["p50"]),
                _fmt(s["index_floor"]["recall_at_k"], 3),
                _fmt(s["server_p50_vs_index_floor"], 2),
            )
        console.print(st)
    tt = Table(title="Targets (issue 5)")
    for col in ("target", "value", "wanted", "met", "detail"):
        tt.add_column(col)
    for g in r.get("targets", []):
        met = "-" if g["met"] is None else ("[green]yes[/green]" if g["met"] else "[red]NO[/red]")
        tt.add_row(
            g["name"],
            _fmt(g["value"], 3) if isinstance(g["value"], float) else _fmt(g["value"]),
            g["target"],
            met,
            g["detail"],
        )
    console.print(tt)


def write_plots(r: dict[str, Any], directory: Path) -> list[Path]:
    """latency_vs_load.png and latency_by_selectivity.png (whichever have data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ol = _ok(r.get("open_loop"))
    if ol and ol.get("server"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for side, style in (("server", "-"), ("echo", "--")):
            pts = ol.get(side, [])
            x = [p["offered_qps"] for p in pts]
            for q, color in (("p50", "tab:blue"), ("p99", "tab:orange"), ("p999", "tab:red")):
                ax.plot(
                    x,
                    [p["e2e"]["latency_us"][q] / 1000 for p in pts],
                    style,
                    color=color,
                    marker="o",
                    label=f"{'endcap' if side == 'server' else 'echo floor'} {q}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, open loop, mixed RPCs)")
        ax.set_ylabel("latency from intended send (ms)")
        ax.set_title(f"Latency vs offered load ({r['catalog']['spec']['n_items']:,} items)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = directory / "latency_vs_load.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    sel = _rows(r.get("selectivity"))
    if sel:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [s["selectivity_mean"] * 100 for s in sel]

        def handler(s: dict[str, Any], q: str) -> float:
            v: float = s["server_side"].get("handler", {}).get("Recommend", {}).get(q, math.nan)
            return v

        ax.plot(x, [handler(s, "p50_us") for s in sel], "-o", label="server p50")
        ax.plot(x, [handler(s, "p99_us") for s in sel], "-o", label="server p99")
        ax.plot(x, [s["e2e"]["latency_us"]["p50"] for s in sel], "--o", label="e2e p50")
        ax.plot(
            x,
            [s["index_floor"]["filtered_us"]["p50"] for s in sel],
            ":o",
            label="raw FAISS filtered p50",
        )
        ax.axhline(P99_TARGET_US, color="red", lw=0.8, label="1 ms target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("items passing the filters (% of catalog)")
        ax.set_ylabel("latency (us)")
        ax.set_title("Recommend latency by filter selectivity (k=20)")
        ax2 = ax.twinx()
        ax2.plot(x, [s["recall_at_20"] for s in sel], "g^-", alpha=0.6, label="recall@20")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("recall@20 vs exact", color="g")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        path = directory / "latency_by_selectivity.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def to_markdown(r: dict[str, Any]) -> str:
    """The run as Markdown tables (what benchmarks/README.md quotes)."""
    m = r["machine"]
    out = [
        f"Command: `{r['command']}`  ",
        f"Run: {r['started_at']}, {r['duration_s']} s; {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gb']} GB RAM, kernel {m['kernel']}, Python {m['python']}, numpy "
        f"{m['numpy']}, faiss {m['faiss']}, grpcio {m['grpcio']}; load average "
        f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end "
        "(other engineers' jobs share the host).",
        "",
        "| target | measured | wanted | met |",
        "|---|---|---|---|",
    ]
    for g in r.get("targets", []):
        value = g["value"]
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        detail = f" ({g['detail']})" if g["detail"] else ""
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        out.append(f"| {g['name']} | {shown}{detail} | {g['target']} | {met} |")
    out += [
        "",
        "| scenario | QPS | e2e p50 | p90 | p99 | p99.9 | max | server p50 | server p99 | "
        "server CPU/call | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(r.get("scenarios", []))
    workers = _ok(r.get("workers"))
    if workers:
        rows.append(workers["scenario"])
    for s in rows:
        e = s["e2e"]["latency_us"]
        handler = s["server_side"].get("handler", {})
        h = next(iter(handler.values()), {}) if len(handler) == 1 else handler.get("Recommend", {})
        errors = sum(s["e2e"]["errors"].values())
        out.append(
            f"| {s['name']} | {_fmt(s['e2e']['achieved_qps'])} | {_fmt(e['p50'])} | "
            f"{_fmt(e['p90'])} | {_fmt(e['p99'])} | {_fmt(e['p999'])} | {_fmt(e['max'])} | "
            f"{_fmt(h.get('p50_us'))} | {_fmt(h.get('p99_us'))} | "
            f"{_fmt(s['e2e'].get('server_cpu_us_per_call'))} | {errors} |"
        )
    sel = _rows(r.get("selectivity"))
    if sel:
        out += [
            "",
            "| passing | items | server p50 | server p99 | ≤ 1 ms | e2e p50 | recall@20 (p10) | "
            "plans | search in-process p50 | raw FAISS p50 (nprobe, recall) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sel:
            h = s["server_side"].get("handler", {}).get("Recommend", {})
            f = s["index_floor"]
            plans = ", ".join(f"{k} {v}" for k, v in s["in_process"]["plans"].items())
            out.append(
                f"| {s['label']} | {s['passing_items_mean']:,} | {_fmt(h.get('p50_us'))} | "
                f"{_fmt(h.get('p99_us'))} | {_fmt(h.get('within_1ms'), 3)} | "
                f"{_fmt(s['e2e']['latency_us']['p50'])} | {s['recall_at_20']:.3f} "
                f"({s['recall_at_20_p10']:.2f}) | {plans} | "
                f"{_fmt(s['in_process']['search_us']['p50'])} | {_fmt(f['filtered_us']['p50'])} "
                f"({_fmt(f['nprobe_median'])}, {f['recall_at_k']:.3f}) |"
            )
    scaling = _rows(r.get("scaling"))
    if scaling:
        out += [
            "",
            "| items | e2e p50 | e2e p99 | server p50 | server p99 | RSS MB | bytes/item "
            "| index build s | load s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in scaling:
            h = s["server_side"].get("handler", {}).get("Recommend", {})
            rss = s["memory"]["rss_mb"]
            out.append(
                f"| {s['items']:,} | {_fmt(s['e2e_us']['p50'])} | {_fmt(s['e2e_us']['p99'])} | "
                f"{_fmt(h.get('p50_us'))} | {_fmt(h.get('p99_us'))} | {_fmt(rss)} | "
                f"{_fmt(rss * 2**20 / s['items'])} | {s['catalog']['index_build_s']:.1f} | "
                f"{s['ready_s']:.1f} |"
            )
    comp = _ok(r.get("compressed"))
    if comp:
        out += [
            "",
            f"IVF-PQ ({comp['catalog']['spec']['pq_m']} bytes/vector, index file "
            f"{comp['catalog']['index_bytes'] / 2**20:.0f} MB, built in "
            f"{comp['catalog']['index_build_s']:.0f} s), serving RSS "
            f"{comp['memory']['rss_mb']:.0f} MB:",
            "",
            "| passing | server p50 | server p99 | recall@20 | plans |",
            "|---|---|---|---|---|",
        ]
        for s in _rows(comp.get("selectivity")):
            h = s["server_side"].get("handler", {}).get("Recommend", {})
            plans = ", ".join(f"{k} {v}" for k, v in s["in_process"]["plans"].items())
            out.append(
                f"| {s['label']} | {_fmt(h.get('p50_us'))} | {_fmt(h.get('p99_us'))} | "
                f"{s['recall_at_20']:.3f} | {plans} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import json
    import sys

    print(to_markdown(json.loads(Path(sys.argv[1]).read_text())))
