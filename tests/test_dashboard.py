"""The Contexts page of the dashboard: served, listed, and rendered in a real browser.

The browser tests drive Debian's ``chromium`` (``apt-get install -y chromium``)
through Playwright's Python package; ``playwright install`` is never needed. They
skip when no chromium is installed, except where ``DASK_CONTEXT_REQUIRE_BROWSER=1``
(CI), where they fail. ``DASK_CONTEXT_SCREENSHOT=docs/images/contexts-page.png``
saves the page of the first browser test there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
from types import SimpleNamespace
from unittest import mock

import dask
import pytest
from distributed import Client, LocalCluster, Scheduler
from distributed.utils_test import gen_cluster, gen_test
from tornado.httpclient import AsyncHTTPClient

import dask_context as dc
from dask_context import ContextSpec, dashboard
from tests.loaders import blob, use_context

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what works in containers and offline machines (no sandbox, GPU, network services)
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT = 60_000  # ms a condition on the page may take to come true (CI machines can be slow)
WITH_DASHBOARD = {"dashboard": True, "dashboard_address": ":0"}


@pytest.fixture(autouse=True)
def installed() -> None:
    # what importing dask_context does for every scheduler started afterwards
    dashboard.install()


async def fetch(s: Scheduler, path: str) -> tuple[int, str]:
    response = await AsyncHTTPClient().fetch(
        f"http://localhost:{s.http_server.port}/{path}", raise_error=False
    )
    return response.code, response.body.decode()


# ---------------------------------------------------------------- served and listed
@gen_cluster(client=True, nthreads=[], scheduler_kwargs=WITH_DASHBOARD, clean_kwargs={"threads": False})
async def test_the_page_is_served_and_listed(c, s):
    from distributed.dashboard.scheduler import applications

    assert dashboard.install() and dashboard.install()
    assert applications[dashboard.PATH] is dashboard.contexts_doc
    code, body = await fetch(s, "contexts")
    assert code == 200 and "Bokeh" in body and "Status" in body  # inside the navigation bar
    code, _ = await fetch(s, "individual-contexts")
    assert code == 200
    # the "More..." menu of every page, and JupyterLab's dask extension
    _, status = await fetch(s, "status")
    assert '<a href="individual-contexts">Contexts</a>' in status
    plots = json.loads((await fetch(s, "individual-plots.json"))[1])
    assert plots["Individual Contexts"] == "/individual-contexts"


@gen_test()
async def test_install_adds_the_page_to_a_running_scheduler():
    from distributed.dashboard.scheduler import applications

    # a scheduler started before anything installed the page
    with mock.patch.dict(applications):
        del applications[dashboard.PATH], applications[dashboard.INDIVIDUAL_PATH]
        async with Scheduler(**WITH_DASHBOARD) as s:
            assert (await fetch(s, "contexts"))[0] == 404
            assert dashboard.install(s)
            assert (await fetch(s, "contexts"))[0] == 200
            apps = list(s.http_application.applications)
            assert dashboard.install(s)
            assert s.http_application.applications == apps  # once only
        async with Scheduler(dashboard=False, dashboard_address=":0") as s:
            assert not dashboard.install(s)


def fake_scheduler(report: dict | None) -> SimpleNamespace:
    plugins = {} if report is None else {"dask-context": SimpleNamespace(report=lambda: report)}
    return SimpleNamespace(plugins=plugins)


def context_row(**kwargs) -> dict:
    row = dict(
        loads=0, load_seconds=0.0, load_time=None, nbytes=None, memory=None, evictions=0,
        failures=0, tasks=0, hits=0, warmups=0, requeued=0, queued=0, running=0, warm=[],
        loading=[], allowed=[], failed_on=[], error=None,
    )
    return {**row, **kwargs}


def worker_row(**kwargs) -> dict:
    return {**dict(budget=1e6, resident={}, loading=[], inflight=0, job=None, draining=False), **kwargs}


def test_the_page_follows_the_report_without_a_browser():
    page = dashboard.ContextsPage(fake_scheduler(None))
    page.update()
    assert page.summary.text == dashboard.EMPTY and "No contexts" in page.contexts.text

    report = {
        "contexts": {"<b>A</b>": context_row(loads=2, load_seconds=3.0, nbytes=400_000, warm=["w1"])},
        "workers": {"w1": worker_row(resident={"<b>A</b>": 400_000}), "w2": worker_row(loading=["<b>A</b>"])},
    }
    page.scheduler = fake_scheduler(report)
    page.update()
    # user-provided names are shown, never interpreted as HTML
    assert "&lt;b&gt;A&lt;/b&gt;" in page.contexts.text and "<b>A</b>" not in page.contexts.text
    assert "1.50 s" in page.contexts.text  # mean load
    assert "40.0 %" in page.workers.text  # 400 kB of a 1 MB budget
    assert list(page.memory.y_range.factors) == ["w1", "w2"]
    assert page.segments.data["state"] == ["resident", "loading"]

    # w1 leaves, w3 joins: the bars and rows follow
    report["workers"] = {"w2": worker_row(), "w3": worker_row(resident={"<b>A</b>": 400_000})}
    page.update()
    assert list(page.memory.y_range.factors) == ["w2", "w3"]
    assert page.segments.data["worker"] == ["w3"]
    assert "w1" not in page.workers.text and "w3" in page.workers.text


# ---------------------------------------------------------------- in a browser
# CI sets DASK_CONTEXT_REQUIRE_BROWSER=1: there a missing chromium (or Playwright, the
# test-browser extra) fails the tests
REQUIRE_BROWSER = os.environ.get("DASK_CONTEXT_REQUIRE_BROWSER") == "1"
PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
needs_chromium = pytest.mark.skipif(
    (CHROMIUM is None or not PLAYWRIGHT) and not REQUIRE_BROWSER,
    reason="chromium or Playwright is not installed "
           '(apt-get install -y chromium; pip install -e ".[test-browser]")',
)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile (Playwright's browser context)."""
    if CHROMIUM is None:
        pytest.fail("DASK_CONTEXT_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install -y chromium)")
    if not PLAYWRIGHT:
        pytest.fail('DASK_CONTEXT_REQUIRE_BROWSER=1 but Playwright is not installed (pip install -e ".[test-browser]")')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 600},
        )
        yield context
        context.close()


def open_page(browser, cluster: LocalCluster) -> tuple:
    """The Contexts page of ``cluster``, and the list its script errors go to."""
    page = browser.new_page()
    errors: list = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(cluster.dashboard_link.replace("/status", "/contexts"))
    return page, errors


def listed(a: str) -> re.Pattern:
    """``a`` as an item of a comma-separated cell (not ``...:4012`` in ``...:40123``)."""
    return re.compile(f"(^|, ){re.escape(a)}(,|$)")


def table_row(page, table: str, first_cell: str):
    """The row of the ``dc-workers`` or ``dc-contexts`` table whose first cell is ``first_cell``."""
    return page.locator(f".{table} tbody tr").filter(
        has=page.locator("td:first-child", has_text=re.compile(f"^{re.escape(first_cell)}$"))
    )


def warm_on(page, context: str):
    """The "Warm on" cell of a context."""
    column = dashboard.CONTEXT_COLUMNS.index("Warm on") + 1
    return table_row(page, "dc-contexts", context).locator(f"td:nth-child({column})")


@needs_chromium
def test_the_page_shows_contexts_and_their_warm_workers(browser):
    from playwright.sync_api import expect

    specs = [
        ContextSpec("llama-8b", blob, args=["llama-8b"], kwargs={"nbytes": 24_000_000, "seconds": 0.3}),
        ContextSpec("reranker", blob, args=["reranker"], kwargs={"nbytes": 9_000_000}),
    ]
    with (
        dask.config.set({"dask-context.worker.memory-budget": 64_000_000}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        page, errors = open_page(browser, cluster)
        expect(page.locator(".dc-summary")).to_contain_text("No dask-context router", timeout=TIMEOUT)

        dc.register(client, *specs)
        for spec in specs:
            with dc.use(spec.name):
                client.gather(client.map(use_context, range(10), name=spec.name, seconds=0.02))
        report = dc.report(client)
        expect(page.locator(".dc-summary")).to_contain_text("2 context(s) on 2 worker(s)", timeout=TIMEOUT)
        for spec in specs:
            info = report["contexts"][spec.name]
            assert info["warm"], info
            for a in info["warm"]:
                expect(warm_on(page, spec.name)).to_have_text(listed(a), timeout=TIMEOUT)
        for a, w in report["workers"].items():
            row = table_row(page, "dc-workers", a)
            expect(row).to_contain_text("61.04 MiB", timeout=TIMEOUT)  # the budget
            for name in w["resident"]:
                expect(row).to_contain_text(name, timeout=TIMEOUT)
        assert not errors
        if os.environ.get("DASK_CONTEXT_SCREENSHOT"):
            page.screenshot(path=os.environ["DASK_CONTEXT_SCREENSHOT"], full_page=True)


@needs_chromium
def test_the_page_follows_a_killed_and_replaced_worker(browser):
    from playwright.sync_api import expect

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        # eager: every worker loads it when it starts, the nanny's replacement too
        dc.register(client, ContextSpec("embedder", blob, args=["embedder"], eager=True))
        page, errors = open_page(browser, cluster)
        before = sorted(client.scheduler_info()["workers"])
        warm = warm_on(page, "embedder")
        for a in before:
            expect(warm).to_have_text(listed(a), timeout=TIMEOUT)

        victim = before[0]
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        workers = page.locator(".dc-workers tbody tr td:first-child")
        expect(workers.filter(has_text=re.compile(f"^{re.escape(victim)}$"))).to_have_count(0, timeout=TIMEOUT)
        expect(workers).to_have_count(2, timeout=TIMEOUT)  # the replacement joined
        shown = set(workers.all_inner_texts())
        (replacement,) = shown - set(before)
        assert replacement in client.scheduler_info()["workers"]
        expect(warm).to_have_text(listed(replacement), timeout=TIMEOUT)
        expect(warm).not_to_have_text(listed(victim))
        assert not errors
