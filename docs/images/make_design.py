"""Draw docs/images/design.png: the data flow of dask-context, one box per module.

Run ``python docs/images/make_design.py`` after changing the design; it writes the
image next to this script. Needs matplotlib only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

HERE = Path(__file__).resolve().parent

CLIENT, SCHED, WORKER, OBS = "#dbe9f6", "#fde9c9", "#d9f0d3", "#eeeeee"

#: name -> (x, y, width, height, colour, title, modules)
A, C, B, D, W = 0.3, 4.3, 8.5, 12.9, 3.4
BOXES = {
    "client": (A, 7.6, W, 1.5, CLIENT, "client: mark tasks",
               "api.py (use, delayed,\nregister, report)\ngraph.py (marks kept)"),
    "handlers": (C, 5.6, W, 1.6, SCHED, "handlers",
                 "_router_handlers.py\nscheduler.py (ContextRouter)"),
    "observers": (C, 2.0, W, 2.9, OBS, "observers (RouterView)",
                  "_observers.py, _setup.py\ndashboard.py (page)\nmetrics.py (Prometheus)\n"
                  "adaptive.py (Scaling:\nscale-in filter, drain)"),
    "report": (C, 0.45, W, 1.1, OBS, "report", "_router_report.py"),
    "intake": (B, 7.6, W, 1.5, SCHED, "Dask hooks: park, queue",
               "_router_intake.py\n_router_learning.py"),
    "loop": (B, 4.4, W, 1.8, SCHED, "routing loop",
             "_router_loop.py\n_router_views.py\npolicy.py, state.py"),
    "guard": (B, 2.7, W, 1.2, SCHED, "guarantees", "_router_guard.py"),
    "worker": (D, 5.0, W, 2.5, WORKER, "worker: load once, run warm",
               "worker.py (ContextPlugin,\nget_context)\ncache.py, tiers.py,\ndevices.py"),
    "peer": (D, 3.4, W, 1.2, WORKER, "peer copies", "staging.py"),
    "drain": (D, 1.6, W, 1.3, WORKER, "drain before preemption", "preemption.py"),
}

#: (start, end, label, label offset (dx, dy))
ARROWS = [
    ((A + W, 8.7), (B, 8.7), "marked tasks (update_graph)", (0, 0.22)),
    ((A + W, 7.9), (C + W / 2, 7.2), "register(spec)", (-0.2, 0.1)),
    ((B + 0.9, 7.6), (B + 0.9, 6.2), "queued, wake()", (0.75, 0.3)),
    ((B + W / 2, 3.9), (B + W / 2, 4.4), "re-plan, survey", (1.0, 0)),
    ((B + W, 5.4), (D, 5.4), "feed tasks to warm\nworkers; warm-up;\nevict first", (0, -0.5)),
    ((D, 7.2), (B + W, 8.0), "events: loaded, evicted,\nfailed, uses (log_event)", (0.4, 1.0)),
    ((D, 6.6), (C + W, 6.6), "snapshots (worker_joined);\nfile_peers, file_source", (0.9, 0)),
    ((D + W / 2, 5.0), (D + W / 2, 4.6), "", (0, 0)),
    ((D, 2.3), (C + W, 2.3), "drain: no new tasks (dask_context_drain)", (0, 0.2)),
    ((B, 4.9), (C + W, 4.2), "views(), wake()", (0, 0.25)),
    ((C + W / 2, 1.55), (C + W / 2, 2.0), "", (0, 0)),
]


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(15, 9.4), dpi=100)
    ax.set_xlim(0, 16.6)
    ax.set_ylim(0, 10)
    ax.axis("off")
    for x0, x1, colour, title in [(0.1, 3.9, CLIENT, "client process"),
                                  (4.1, 12.1, SCHED, "scheduler: ContextRouter and its observers"),
                                  (12.7, 16.5, WORKER, "each worker")]:
        ax.add_patch(FancyBboxPatch((x0, 0.2), x1 - x0, 9.3, boxstyle="round,pad=0.02",
                                    fc="none", ec=colour, lw=3, ls="--"))
        ax.text((x0 + x1) / 2, 9.7, title, ha="center", va="center", fontsize=12,
                weight="bold", color="#555555")
    for x, y, w, h, colour, title, module in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05",
                                    fc=colour, ec="#444444", lw=1.2))
        ax.text(x + w / 2, y + h - 0.25, title, ha="center", va="center", fontsize=10.5,
                weight="bold")
        ax.text(x + w / 2, y + (h - 0.4) / 2, module, ha="center", va="center",
                fontsize=9, family="monospace")
    for start, end, label, (dx, dy) in ARROWS:
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=15,
                                     lw=1.5, color="#333333"))
        if label:
            mx, my = (start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy
            ax.text(mx, my, label, ha="center", va="center", fontsize=8.5, color="#222222",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.9, "pad": 1.5})
    ax.text(D + W / 2 + 0.9, 4.8, "cold load", fontsize=8.5, ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    draw(HERE / "design.png")
