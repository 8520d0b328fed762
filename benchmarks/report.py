"""Turn measurements into rows, and rows into ``results.json``, ``results.md`` and
``results.png``.

Every row is one arm of one run. ``reduction`` compares the arm with the
load-per-task arm of the same run (the papers' "-72.1%"), ``x_limit`` with the
physical limit ``T*`` of :func:`benchmarks.plan.limit`; ``reruns`` counts task
starts beyond each task's first (work lost to preemption).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.calibrate import Calibration
from benchmarks.plan import HPDC, PAPER2, Run, ideal_load_per_task, limit, realized_ratio

logger = logging.getLogger(__name__)

BASELINE = "load-per-task"
OURS = "dask-context"
TARGETS = {PAPER2: 72.1, HPDC: 94.5}
"""Reduction vs load-per-task the papers report in each regime (percent)."""
LIMIT_SLACK = 1.10
"""dask-context should finish within 10% of the limit."""

PROFILE_PARTS = ("extra_loads", "slow_tasks", "startup", "gaps", "tail", "other")


def row(run: Run, arm: str, measured: dict[str, Any], cal: Calibration, workers: int) -> dict[str, Any]:
    """One table row from an arm's measurements (``reduction`` is filled in later)."""
    t_star = limit(run, cal, workers)
    ideal = ideal_load_per_task(run, cal, workers)
    wall = measured.get("wall")
    warnings = measured.get("warnings", [])
    return {
        "scenario": run.scenario.name,
        "title": run.scenario.title,
        "regime": run.regime,
        "ratio": realized_ratio(run, cal),
        "batch": run.batch,
        "items": run.items,
        "models": run.scenario.models,
        "tasks": run.tasks,
        "arm": arm,
        # measurements of this arm in this run before this one (``--repeat``)
        "repeat": 0,
        "status": measured.get("error", "ok"),
        "wall": wall,
        "scheduler_cpu": measured.get("scheduler_cpu"),
        "loads": measured.get("loads"),
        "loads_per_model": measured.get("loads_per_model"),
        "load_seconds": measured.get("load_seconds"),
        "kills": len(measured.get("kills", [])),
        "warnings": len(warnings),
        "left_in_grace": [w["left_after"] for w in warnings if w["left_after"] is not None],
        "reruns": measured.get("reruns"),
        "results": sum(measured.get("verdicts", {}).values()),
        "limit": t_star,
        "x_limit": wall / t_star if wall else None,
        "ideal_load_per_task": ideal,
        "best_reduction": 100 * (1 - t_star / ideal),
        "reduction": None,
        "profile": measured.get("profile"),
        "extra": measured.get("extra", {}),
        "timeline": measured.get("timeline"),
    }


def fill_reductions(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``reduction`` of each row against the load-per-task row of its run."""
    base = {
        (r["scenario"], r["batch"]): r["wall"]
        for r in rows
        if r["arm"] == BASELINE and r["wall"]
    }
    for r in rows:
        b = base.get((r["scenario"], r["batch"]))
        if b and r["wall"]:
            r["reduction"] = 100 * (1 - r["wall"] / b)


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _change(reduction: float | None) -> str:
    """A reduction in percent as the papers write it: 72.1 -> "-72.1%"."""
    return "-" if reduction is None else f"{0.0 - reduction:+.1f}%"


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any], cal: Calibration | None,
             coldstart: Sequence[dict[str, Any]] = ()) -> str:
    """The Markdown report: setup, results table, targets, dask-context's time breakdown,
    then the cold-start scenario (``cal`` is None when only that one ran)."""
    lines = [
        "# dask-context benchmark results",
        "",
        f"Command: `{meta['command'].strip()}` — {meta['duration']:.0f} s in all, finished "
        f"{meta['date']}. Load average (1 min) {meta['loadavg_before'][0]:.1f} at the start, "
        f"{meta['loadavg_after'][0]:.1f} at the end.",
        "",
        f"Machine: {meta['machine']}. {meta['workers']} Dask worker processes with 1 thread "
        "each, torch intra-op threads 1 per worker.",
        "",
    ]
    if cal is not None:
        lines += scenarios_report(rows, meta, cal)
    if coldstart:
        lines += ["", "## Cold start: workers starting at once against shared storage", "",
                  *coldstart_table(coldstart)]
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in meta["notes"])]
    return "\n".join(lines) + "\n"


def first(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each arm's first measurement: the rows of the tables that show one per arm
    (``repeat`` is absent from results.json files written before arms were repeated)."""
    return [r for r in rows if not r.get("repeat")]


def scenarios_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], cal: Calibration) -> list[str]:
    """Model, calibration, the results table, the repeated comparisons, targets and
    the time breakdown."""
    repeated = comparisons(rows)
    rows = first(rows)
    t_list = ", ".join(f"B={b}: {t * 1e3:.1f} ms" for b, t in sorted(cal.item_seconds.items()))
    lines = [
        f"Model: `make_model(..., preset={meta['preset']!r})`, {meta['checkpoint_mb']:.0f} MB "
        f"on disk, {cal.nbytes / 1e6:.0f} MB loaded ({meta['dtype']}). Loads read the "
        f"checkpoint cold at {meta['storage_mbps']:g} MB/s (0 = disk speed), then "
        "`load_causal_lm`.",
        "",
        f"Measured in this run: **L = {cal.load_seconds:.2f} s** per load "
        f"(samples {', '.join(f'{s:.2f}' for s in cal.load_samples)}); "
        f"**t** per claim: {t_list}.",
        "",
        "`L/(B·t)`: the cost regime (load / per-task inference). `vs load-per-task`: "
        "wall-time reduction against the arm that loads in every task. `x limit`: wall "
        "time / T*, T* = (max(models, workers)·L + models·N·t) / workers (one load per "
        "worker, then pure inference spread evenly). `best`: the reduction T* itself "
        "would show. Where `x limit` is well above `x in-run` in the breakdown below, the "
        "machine was slower during that arm than during calibration (other processes on "
        "the 2 cores), not the scheduling.",
        "",
        "| scenario | B | N | L/(B·t) | arm | wall (s) | loads | vs load-per-task | best | x limit | kills |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wall = _fmt(r["wall"], ".1f") if r["status"] == "ok" else f"failed: {r['status']}"
        lines.append(
            f"| {r['scenario']} | {r['batch']} | {r['items']}"
            f"{'x' + str(r['models']) if r['models'] > 1 else ''} | {r['ratio']:.2f} | "
            f"{r['arm']} | {wall} | {_fmt(r['loads'], 'd')} | "
            f"{_change(r['reduction'])} | {_change(r['best_reduction'])} | "
            f"{_fmt(r['x_limit'], '.2f')} | {r['kills']} |"
        )
    if repeated:
        lines += ["", "## Repeated arms: dask-context against the global cache, warned with and "
                  "without peers", "", *repeated]
    lines += ["", "## Targets", "", *targets(rows)]
    preempted = preemption_table(rows, meta)
    if preempted:
        lines += ["", "## Preemption", "", *preempted]
    lines += ["", "## Where the time went (Dask arms)", "", *breakdown_table(rows)]
    return lines


COMPARISONS = ((OURS, "global-cache"), ("dask-context warned+peers", "dask-context warned"))
"""(arm, the arm it must be no slower than), compared on every run measuring both."""


def verdict(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """Whether ``ours`` is no slower than ``theirs``: **yes** when its median is at
    most theirs, **within noise** when the difference of the medians is within the
    larger spread (max - min) of the two arms' repeats, else **no**.

    >>> verdict([10, 11, 12], [11, 12, 13]), verdict([12.2, 12.4], [11, 12.5]), verdict([14], [10])
    ('yes', 'within noise', 'no')
    """
    a, b = statistics.median(ours), statistics.median(theirs)
    if a <= b:
        return "yes"
    noise = max(max(ours) - min(ours), max(theirs) - min(theirs))
    return "within noise" if a - b <= noise else "no"


def comparisons(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The arms measured several times in one run, side by side: each measurement in
    the order taken, the median ratio, and whether the first arm is no slower."""
    runs: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["wall"]:
            runs.setdefault((r["scenario"], r["batch"]), {}).setdefault(r["arm"], []).append(r)
    lines = []
    for ours, theirs in COMPARISONS:
        for (scenario, batch), arms in runs.items():
            a, b = arms.get(ours, []), arms.get(theirs, [])
            if not a or not b or max(len(a), len(b)) < 2:
                continue
            wa, wb = [r["wall"] for r in a], [r["wall"] for r in b]
            lines.append(
                f"| {scenario} B={batch} | {ours} | {', '.join(f'{w:.2f}' for w in wa)} | "
                f"{theirs} | {', '.join(f'{w:.2f}' for w in wb)} | "
                f"{statistics.median(wa) / statistics.median(wb):.3f} | "
                f"{statistics.median(r['x_limit'] for r in a):.2f} / "
                f"{statistics.median(r['x_limit'] for r in b):.2f} | **{verdict(wa, wb)}** |"
            )
    if not lines:
        return []
    return [
        "Each arm measured several times in the same run, on the same cluster, in "
        "reverse order every other round. `walls`: each measurement, in the order taken. "
        "`ratio`: median against median. `x limit`: medians. `no slower`: **yes** when "
        "the first arm's median is at most the second's, **within noise** when the "
        "medians differ by less than the larger spread (max - min) of the two arms' "
        "repeats, else **no**.",
        "",
        "| run | arm | walls (s) | against | walls (s) | ratio | x limit | no slower |",
        "|---|---|---|---|---|---:|---:|---|",
        *lines,
    ]


def preemptions(r: dict[str, Any]) -> int:
    """Preemptions of an arm: warnings, and kills that no warning announced.

    A warned worker that did not leave within its grace is killed as well; that
    kill is part of its preemption.
    """
    warned = r.get("warnings", 0)
    return warned or r["kills"]


def preemption_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Every preempted arm: wall time, loads, distance to T*, and the work it lost."""
    rows = [r for r in rows if r["status"] == "ok" and preemptions(r) and r.get("reruns") is not None]
    if not rows:
        return []
    lines = [
        "Workers taken away while an arm runs: the first once a quarter of the results "
        f"are in, then one every {meta['preempt_every']:g} s. SIGKILL arms: no warning, the "
        "nanny restarts the process cold. `warned` arms: SIGTERM, and SIGKILL "
        f"{meta.get('grace', 0):g} s later unless the worker drained and left; a new "
        "worker process, started at the warning, replaces it. `warned+peers` also declares the "
        "context with `files=` the checkpoint and makes each worker process a node of its "
        "own: a replacement copies the checkpoint from a peer, and only copies made from "
        "`files` read the storage. `reruns`: task starts beyond each task's first (from "
        "the workers' task-start log), i.e. work lost; a warned worker loses at most the "
        "tasks it is running when half its grace is over. `checkpoint`: where each "
        "loaded copy came from.",
        "",
        "| run | arm | preemptions | wall (s) | loads | x limit | reruns | reruns / preemption | checkpoint |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        n = preemptions(r)
        if r.get("warnings"):
            left = r["left_in_grace"]
            how = f"{n} warned: {len(left)} left in grace"
            if left:
                how += f" (after {', '.join(f'{x:.1f}' for x in left)} s)"
            how += f", {r['kills']} killed"
        else:
            how = f"{n} SIGKILL"
        staged = r["extra"].get("staged")
        if staged:
            origins = [c["origin"] for c in staged]
            copies = ", ".join(
                f"{origins.count(o)} from {o} "
                f"({statistics.median(c['seconds'] for c in staged if c['origin'] == o):.2f} s)"
                for o in sorted(set(origins))
            ) + f"; {r['extra']['source_bytes'] / 1e6:.0f} MB from the storage"
        else:
            copies = "storage, every load"
        lines.append(
            f"| {r['scenario']} B={r['batch']} | {r['arm']} | {how} | {r['wall']:.1f} | "
            f"{_fmt(r['loads'], 'd')} | {r['x_limit']:.2f} | {r['reruns']} | "
            f"{r['reruns'] / n:.2f} | {copies} |"
        )
    return lines


def coldstart_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The cold-start arms next to their bounds (see :mod:`benchmarks.coldstart`)."""
    r0 = rows[0]
    transfer = r0["checkpoint_bytes"] / (r0["mbps"] * 1e6)
    lines = [
        f"{r0['workers']} worker processes, each a node of its own (node name and staging "
        f"directory), load a {r0['checkpoint_bytes'] / 1e6:.1f} MB checkpoint at once (an "
        f"eager context) from emulated shared storage of {r0['mbps']:g} MB/s in all, shared "
        f"by every reader (S/B = {transfer:.2f} s). `all warm`: seconds from registration "
        "to the last worker's load. Bounds, with l = "
        f"{r0['local_load']:.2f} s a load from a local copy: filesystem N·S/B + l (the "
        "storage delivers N copies), peer bootstrap S/B + l (one copy; peers infinitely "
        "fast). `shared` and `peers`: MB read from the storage and fetched from peers. "
        "`copies`: where each worker's copy came from, and the median seconds it took. "
        "`worker CPU`: CPU seconds of all worker processes until all were warm; on this "
        "machine's cores an arm takes at least that divided by the cores.",
        "",
        "| arm | all warm (s) | bound (s) | x bound | shared (MB) | peers (MB) | worker CPU (s) | copies |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        wall = _fmt(r["all_warm"], ".2f") if r["status"] == "ok" else f"failed: {r['status']}"
        origins = ", ".join(
            f"{r['origins'].count(o)} from {o} ({r['copy_seconds'][o]:.2f} s)" for o in sorted(set(r["origins"]))
        ) or "-"
        lines.append(
            f"| {r['arm']} | {wall} | {r['bound']:.2f} | {_fmt(r['x_bound'], '.2f')} | "
            f"{r['shared_bytes'] / 1e6:.1f} | {r['peer_bytes'] / 1e6:.1f} | {r['worker_cpu']:.1f} | {origins} |"
        )
    return lines


def in_run_limit(r: dict[str, Any]) -> float | None:
    """T* with the inference speed the arm actually got, from its task timeline.

    ``compute - extra_loads`` (per worker) is the minimum loads plus the inference
    as fast as it ran in this arm: what T* would be had the machine been as busy
    during calibration. Comparing with it separates orchestration overhead
    (startup, gaps, tail, extra loads) from contention by other processes.
    """
    p = r.get("profile")
    if not p:
        return None
    return p["compute"] - p["extra_loads"]


def corrected_wall(r: dict[str, Any]) -> float | None:
    """Wall time less the slowdown of task compute against calibration (``slow_tasks``)."""
    p = r.get("profile")
    return None if not p or r["wall"] is None else r["wall"] - p["slow_tasks"]


def targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per dask-context row: reduction vs the papers, distance to the limit."""
    base = {(r["scenario"], r["batch"]): r for r in rows if r["arm"] == BASELINE and r["wall"]}
    out = []
    for r in rows:
        if not r["arm"].startswith(OURS) or r["status"] != "ok":
            continue
        arm = "" if r["arm"] == OURS else f", {r['arm']}"
        parts = [f"- **{r['scenario']} B={r['batch']}{arm}** (L/(B·t) = {r['ratio']:.2f}):"]
        target = TARGETS.get(r["regime"])
        if target is not None and r["reduction"] is not None:
            verdict = "met" if r["reduction"] >= target else "missed"
            parts.append(
                f"reduction {r['reduction']:.1f}% vs the papers' {target}%: {verdict} "
                f"(this run's shape allows at most {r['best_reduction']:.1f}%);"
            )
        elif r["reduction"] is not None:
            parts.append(f"reduction {r['reduction']:.1f}%;")
        verdict = "met" if r["x_limit"] <= LIMIT_SLACK else "missed"
        parts.append(f"{r['x_limit']:.2f}x T*, within 10%: {verdict}.")
        own, b = corrected_wall(r), base.get((r["scenario"], r["batch"]))
        limit_now = in_run_limit(r)
        if own is not None and limit_now:
            parts.append(f"Against the in-run limit (inference as fast as it ran): {r['wall'] / limit_now:.2f}x.")
        theirs = corrected_wall(b) if b is not None else None
        if own is not None and theirs:
            parts.append(
                "With each arm's task slowdown removed (wall - slow tasks): reduction "
                f"{100 * (1 - own / theirs):.1f}%, {own / r['limit']:.2f}x T*."
            )
        out.append(" ".join(parts))
    return out or ["- no dask-context row"]


def breakdown_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Seconds of wall time above the limit, per cause (see :mod:`benchmarks.timeline`)."""
    lines = [
        "Seconds of wall time above T*, from the scheduler's task stream and the load "
        "log (worker-seconds / workers; see `benchmarks/timeline.py`). `slow tasks` is "
        "task compute beyond loads and calibrated inference: mostly contention from "
        "other processes when it is large for every arm of a run. `in-run T*`: T* with "
        "the inference speed the arm actually got; `x in-run` = wall / in-run T* is the "
        "orchestration overhead alone. `scheduler CPU`: CPU seconds of the driver "
        "process (LocalCluster's scheduler and the client) during the arm, taken from "
        "the 2 cores the workers use.",
        "",
        "| run | arm | wall | T* | extra loads | slow tasks | startup | gaps | tail | other "
        "| in-run T* | x in-run | scheduler CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r.get("profile")
        if not p or r["status"] != "ok":
            continue
        cells = " | ".join(f"{p[k]:+.2f}" for k in PROFILE_PARTS)
        now = in_run_limit(r)
        lines.append(
            f"| {r['scenario']} B={r['batch']} | {r['arm']} | {r['wall']:.1f} | {r['limit']:.1f} | {cells} | "
            f"{_fmt(now, '.1f')} | {_fmt(r['wall'] / now if now else None, '.2f')} | "
            f"{_fmt(r.get('scheduler_cpu'), '.2f')} |"
        )
    return lines


def plot(rows: Sequence[dict[str, Any]], path: Path, coldstart: Sequence[dict[str, Any]] = ()) -> None:
    """Wall time / T* per arm over the batch-size sweep; wall time per arm elsewhere;
    time until all workers are warm per cold-start arm, next to its bound.

    The sweep's runs have different sizes, so they are compared through the limit:
    an arm at 1 is as fast as physically possible, whatever the batch size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = first(rows)
    ok = [r for r in rows if r["status"] == "ok" and r["wall"]]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    others = list(dict.fromkeys(r["scenario"] for r in ok if r["scenario"] != "single"))
    sweep = [r for r in ok if r["scenario"] == "single"]
    panels = bool(sweep) + len(others) + bool(coldstart)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(1 + 4 * max(panels, 1), 4.4), squeeze=False)
    if coldstart:
        plot_coldstart(axes[0][-1], coldstart)
    if sweep:
        plot_sweep(axes[0][0], sweep, arms, colors)
    for ax, scenario in zip(axes[0][bool(sweep) : bool(sweep) + len(others)], others, strict=True):
        sub = [r for r in ok if r["scenario"] == scenario]
        labels = [r["arm"] for r in sub]
        bars = ax.bar(labels, [r["wall"] for r in sub], color=[colors[a] for a in labels])
        for bar, r in zip(bars, sub, strict=True):
            # results.json files from before reruns were counted have none
            reruns = f", {r['reruns']} reruns" if preemptions(r) and r.get("reruns") is not None else ""
            ax.annotate(f"{r['loads']} loads{reruns}\n{r['x_limit']:.2f}x T*",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.axhline(sub[0]["limit"], color="k", ls="--", label="limit T*")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, 1.2 * max(r["wall"] for r in sub))
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"{scenario}: {sub[0]['title']} (B={sub[0]['batch']})", fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(ax: Any, sweep: Sequence[dict[str, Any]], arms: Sequence[str], colors: dict[str, str]) -> None:
    """Wall time / T* per arm over the batch sizes of the ``single`` scenario."""
    from matplotlib.ticker import NullFormatter

    for arm in arms:
        pts = sorted((r["batch"], r["x_limit"]) for r in sweep if r["arm"] == arm)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[arm], label=arm)
    ax.axhline(1.0, color="k", ls="--", label="limit T*")
    ax.axhline(LIMIT_SLACK, color="k", ls=":", label="T* + 10%")
    batches = sorted({r["batch"] for r in sweep})
    ax.set(xscale="log", yscale="log", xlabel="claims per task B (L/(B·t) below)",
           ylabel="wall time / T*")
    ax.set_xticks(batches)
    ax.set_xticklabels([
        f"{b}\n{next(r['ratio'] for r in sweep if r['batch'] == b):.2g}" for b in batches
    ])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title("one model: batch-size sweep", fontsize=10)
    ax.legend(fontsize=8)


def plot_coldstart(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Time until all workers are warm per cold-start arm, its bound as a dashed line."""
    ok = [r for r in rows if r["status"] == "ok"]
    for i, r in enumerate(ok):
        bar = ax.bar(i, r["all_warm"], color=f"C{i}", label=r["arm"])[0]
        ax.hlines(r["bound"], i - 0.4, i + 0.4, color="k", ls="--", label="bound" if i == 0 else None)
        ax.annotate(f"{r['shared_bytes'] / 1e6:.0f} MB shared\n{r['x_bound']:.2f}x bound",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ok)), [r["arm"] for r in ok])
    ax.set_ylim(0, 1.5 * max([r["all_warm"] for r in ok] + [r["bound"] for r in ok], default=1))
    ax.set_ylabel("seconds until all warm")
    ax.legend(fontsize=8, loc="upper left")
    w = rows[0]
    ax.set_title(f"cold start: {w['workers']} workers, {w['mbps']:g} MB/s shared", fontsize=10)


def calibration_from_dict(data: dict[str, Any]) -> Calibration:
    """Inverse of ``Calibration.to_dict`` after a JSON round trip (keys become strings)."""
    return Calibration(
        load_seconds=data["load_seconds"],
        load_samples=data["load_samples"],
        item_seconds={int(b): t for b, t in data["item_seconds"].items()},
        nbytes=data["nbytes"],
        batches={float(r): b for r, b in data.get("batches", {}).items()},
    )


def render(results: Path, out: Path) -> None:
    """Re-write ``results.md`` and ``results.png`` from a ``results.json``, measuring nothing."""
    data = json.loads(results.read_text())
    rows = data["rows"]
    fill_reductions(rows)
    out.mkdir(parents=True, exist_ok=True)
    cal = calibration_from_dict(data["calibration"]) if data["calibration"] else None
    cold = data.get("coldstart", [])
    (out / "results.md").write_text(markdown(rows, data["meta"], cal, cold))
    plot(rows, out / "results.png", cold)


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], cal: Calibration | None,
          coldstart: list[dict[str, Any]]) -> None:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "calibration": cal.to_dict() if cal else None, "rows": rows, "coldstart": coldstart}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "results.md").write_text(markdown(rows, meta, cal, coldstart))
    plot(rows, out / "results.png", coldstart)
    logger.info("Wrote %s", out)
