"""The "Contexts" page of the scheduler's Dask dashboard.

It shows, updated twice a second from the router's :meth:`~dask_context.scheduler.
ContextRouter.report`, what each worker holds against its memory budget, what it is
loading and how many context tasks it runs, and for each context its queue, warm
workers, loads, cache hits, evictions, failures and load times. A scheduler without
a router (nothing registered yet) shows an empty page that fills in once contexts
are registered.

distributed builds its dashboard from the module-level ``applications`` dict of
:mod:`distributed.dashboard.scheduler` when a scheduler's HTTP server starts
(``Scheduler.__init__``). :func:`install` adds this page there, so it must run
before the scheduler is created: importing :mod:`dask_context` does it, which covers
a LocalCluster made after the import and ``dask scheduler --preload dask_context``
(preload modules are imported in ``Scheduler.__init__``, before the dashboard
starts). ``install(scheduler)`` also adds the page to a scheduler already running.
"""

from __future__ import annotations

import html
import logging
import math
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes, format_time

from dask_context._protocol import ROUTER_NAME

if TYPE_CHECKING:
    from bokeh.document import Document
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: the page, with distributed's navigation bar
PATH = "/contexts"
#: the page alone, listed in the dashboard's "More..." menu and in JupyterLab's
#: dask extension, like distributed's own ``individual-*`` plots
INDIVIDUAL_PATH = "/individual-contexts"
#: milliseconds between two updates of an open page
INTERVAL = 500

EMPTY = (
    "No dask-context router on this scheduler yet: register contexts with "
    "<code>dask_context.register(client, spec)</code> and they appear here."
)
NO_CONTEXTS = "The router runs, but no context is registered yet."


def install(scheduler: Scheduler | None = None) -> bool:
    """Add the Contexts page to the Dask dashboard; calling it again does nothing.

    Parameters
    ----------
    scheduler
        None: every scheduler whose dashboard starts later in this process serves
        the page. A running scheduler: it also serves the page from now on, if its
        dashboard runs and lacks the page; call this on the scheduler's event loop
        (a preload's ``dask_setup``, ``client.run_on_scheduler``).

    Returns
    -------
    Whether the page is (or will be) served: False without a usable bokeh, or when
    ``scheduler`` runs without a dashboard.
    """
    try:
        from distributed.dashboard.scheduler import applications
    except ImportError:  # distributed finds no bokeh, or one it does not support
        logger.info("No Dask dashboard here (bokeh missing or unsupported): no Contexts page")
        return False
    applications.setdefault(PATH, contexts_doc)
    applications.setdefault(INDIVIDUAL_PATH, individual_contexts_doc)
    return scheduler is None or _serve(scheduler)


def _serve(scheduler: Scheduler) -> bool:
    """Serve the page on a running scheduler's dashboard, as a second Bokeh app.

    distributed's own Bokeh app is built once, from ``applications`` as it was when
    the dashboard started; a second one beside it, made the way distributed makes
    its own, serves paths the first lacks.
    """
    from bokeh.server.tornado import BokehTornado
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    http = getattr(scheduler, "http_application", None)
    served = [app for app in getattr(http, "applications", ()) if isinstance(app, BokehTornado)]
    if not served:
        return False
    if any(PATH in app.app_paths for app in served):
        return True
    app = BokehApplication(
        {PATH: contexts_doc, INDIVIDUAL_PATH: individual_contexts_doc},
        scheduler,
        prefix=served[0].prefix,
        template_variables=template_variables(scheduler),
    )
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    logger.info("Contexts page added to the running dashboard of %s", scheduler.address)
    return True


def contexts_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """Bokeh document of ``/contexts``: the page inside distributed's navigation."""
    from distributed.dashboard.components.scheduler import env

    _build(scheduler, doc)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)


def individual_contexts_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """Bokeh document of ``/individual-contexts``: the page alone."""
    _build(scheduler, doc)


def _build(scheduler: Scheduler, doc: Document) -> None:
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME

    page = ContextsPage(scheduler)
    page.update()
    # distributed's helper holds the page weakly: a closed tab leaves no cycle behind
    add_periodic_callback(doc, page, INTERVAL)
    doc.title = "Dask: Contexts"
    doc.add_root(page.root)
    doc.theme = BOKEH_THEME


def _router_report(scheduler: Scheduler) -> dict[str, Any] | None:
    """The router's report, or None while no router runs on ``scheduler``."""
    router = scheduler.plugins.get(ROUTER_NAME)
    return router.report() if router is not None else None


def _seconds(value: float | None) -> str:
    return "-" if value is None else format_time(value)


def _budget(value: float | None) -> str:
    if value is None:
        return "unknown"
    return "unlimited" if math.isinf(value) else format_bytes(value)


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]], empty: str) -> str:
    """An HTML table; every cell is escaped (context names and errors come from users)."""
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(
            # numbers align right, as in distributed's tables
            f'<td class="num">{v}</td>' if isinstance(v, int) else f"<td>{html.escape(str(v))}</td>"
            for v in row
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Tables are HTML in Divs, not Bokeh DataTables: with bokeh 3.9 a DataTable does not
# redraw when its source changes without changing length (distributed's own Workers
# table stays frozen the same way), and these tables mostly change in place.
STYLE = """
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f5f5f5; }
td.num { text-align: right; }
p.empty { color: #666; }
"""

WORKER_COLUMNS = (
    "Worker", "Resident contexts", "Used", "Budget", "% of budget", "Loading",
    "Tasks running", "State",
)
CONTEXT_COLUMNS = (
    "Context", "Queued", "Running", "Warm on", "Loading on", "Loads", "Hits", "Evictions",
    "Failed loads", "Mean load", "Load estimate", "Size", "Last load error",
)


class ContextsPage:
    """Bokeh models of the page and the :meth:`update` that refreshes them.

    Parameters
    ----------
    scheduler
        The scheduler whose router is shown.
    """

    def __init__(self, scheduler: Scheduler):
        from bokeh.layouts import column
        from bokeh.models import ColumnDataSource, Div, FactorRange, HoverTool, NumeralTickFormatter
        from bokeh.palettes import Category10_10
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self.palette = Category10_10
        # the classes name the parts for the browser tests and for users' own CSS
        self.summary = Div(text=EMPTY, sizing_mode="stretch_width", css_classes=["dc-summary"])
        self.workers = Div(sizing_mode="stretch_width", stylesheets=[STYLE], css_classes=["dc-workers"])
        self.contexts = Div(sizing_mode="stretch_width", stylesheets=[STYLE], css_classes=["dc-contexts"])

        self.segments = ColumnDataSource(
            {k: [] for k in ("worker", "context", "left", "right", "middle", "size", "state", "hatch", "color")}
        )
        self.budgets = ColumnDataSource({"worker": [], "budget": []})
        self.memory = figure(
            title="Context memory per worker (dashed: the worker's budget; hatched: loading)",
            y_range=FactorRange(factors=[]), x_range=(0, 1), height=80,
            sizing_mode="stretch_width", toolbar_location=None, tools="",
        )
        self.memory.hbar(
            y="worker", left=0, right="budget", height=0.8, source=self.budgets,
            fill_alpha=0, line_color="black", line_dash="dashed",
        )
        bars = self.memory.hbar(
            y="worker", left="left", right="right", height=0.6, source=self.segments,
            fill_color="color", line_color="white", hatch_pattern="hatch", hatch_color="white",
        )
        self.memory.text(
            x="middle", y="worker", text="context", source=self.segments,
            text_align="center", text_baseline="middle", text_font_size="11px", text_color="white",
        )
        self.memory.add_tools(HoverTool(
            renderers=[bars], tooltips=[("context", "@context"), ("size", "@size"), ("", "@state")],
        ))
        self.memory.xaxis.formatter = NumeralTickFormatter(format="0.0 b")
        self.memory.xgrid.visible = False

        self.root = column(
            self.summary,
            Div(text="<h3>Workers</h3>"), self.memory, self.workers,
            Div(text="<h3>Contexts</h3>"), self.contexts,
            sizing_mode="stretch_width",
        )

    def update(self) -> None:
        """Read the router's report and refresh every model."""
        report = _router_report(self.scheduler)
        if report is None:
            report = {"contexts": {}, "workers": {}}
            summary = EMPTY
        elif not report["contexts"]:
            summary = NO_CONTEXTS
        else:
            contexts, workers = report["contexts"], report["workers"]
            summary = (
                f"<b>{len(contexts)}</b> context(s) on <b>{len(workers)}</b> worker(s): "
                f"<b>{sum(c['queued'] for c in contexts.values())}</b> task(s) queued, "
                f"<b>{sum(c['running'] for c in contexts.values())}</b> running, "
                f"<b>{sum(len(c['loading']) for c in contexts.values())}</b> load(s) under way"
            )
        # Bokeh sends a property only when its value changes: an idle page costs nothing
        self.summary.text = summary
        self.contexts.text = _table(CONTEXT_COLUMNS, self._context_rows(report["contexts"]), "No contexts.")
        self.workers.text = _table(WORKER_COLUMNS, self._worker_rows(report["workers"]), "No workers.")
        self._update_memory(report["contexts"], report["workers"])

    @staticmethod
    def _context_rows(contexts: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
        rows = []
        for name, c in contexts.items():
            # before its first load, only the spec's estimate of its size is known
            if c["nbytes"] is not None:
                size = format_bytes(c["nbytes"])
            else:
                size = "-" if c["memory"] is None else f"{format_bytes(c['memory'])} (est.)"
            rows.append((
                name, c["queued"], c["running"], ", ".join(c["warm"]), ", ".join(c["loading"]),
                c["loads"], c["hits"], c["evictions"], c["failures"],
                _seconds(c["load_seconds"] / c["loads"] if c["loads"] else None),
                _seconds(c["load_time"]), size, c["error"] or "",
            ))
        return rows

    @staticmethod
    def _worker_rows(workers: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
        rows = []
        for address, w in workers.items():
            used, budget = sum(w["resident"].values()), w["budget"]
            limited = budget is not None and not math.isinf(budget) and budget > 0
            rows.append((
                address,
                ", ".join(f"{c} ({format_bytes(n)})" for c, n in w["resident"].items()),
                format_bytes(used), _budget(budget),
                f"{100 * used / budget:.1f} %" if limited else "-",
                ", ".join(w["loading"]), w["inflight"],
                "draining" if w["draining"] else "running",
            ))
        return rows

    def _update_memory(self, contexts: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]) -> None:
        """Per worker, a bar of its contexts' bytes inside the outline of its budget."""
        colors = {name: self.palette[i % len(self.palette)] for i, name in enumerate(contexts)}
        segments: dict[str, list] = {f: [] for f in self.segments.data}
        budgets: dict[str, list] = {"worker": [], "budget": []}
        widest = 1.0
        for address, w in workers.items():
            held = [(c, n, "resident", " ") for c, n in w["resident"].items()]
            # a context being loaded will take its measured (or estimated) size
            for c in w["loading"]:
                info = contexts.get(c, {})
                size = info.get("nbytes") or info.get("memory")
                if size:
                    held.append((c, size, "loading", "/"))
            left = 0.0
            for c, nbytes, state, hatch in held:
                values = (address, c, left, left + nbytes, left + nbytes / 2, format_bytes(nbytes),
                          state, hatch, colors.get(c, "gray"))
                for f, value in zip(segments, values, strict=True):
                    segments[f].append(value)
                left += nbytes
            widest = max(widest, left)
            if w["budget"] is not None and not math.isinf(w["budget"]):
                budgets["worker"].append(address)
                budgets["budget"].append(w["budget"])
                widest = max(widest, w["budget"])
        factors = list(workers)
        if list(self.memory.y_range.factors) != factors:
            # only current workers have a bar: one that left takes its bar with it
            self.memory.y_range.factors = factors
            self.memory.height = 80 + 40 * len(factors)
        if dict(self.segments.data) != segments:
            self.segments.data = segments
        if dict(self.budgets.data) != budgets:
            self.budgets.data = budgets
        self.memory.x_range.end = widest * 1.05
