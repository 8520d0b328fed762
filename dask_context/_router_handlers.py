"""The router's scheduler handlers, for clients and workers.

Clients register and unregister contexts (``register``, ``unregister``); workers
ask for their settings (``worker_settings``), announce what they hold
(``worker_joined``, applied with ``_apply``), and ask who has a context's files
(``file_peers``) and whether they may read them from the shared filesystem now
(``file_source``). Surveys (``_survey``) read every worker's contexts again, and
with ``repair`` install missing plugins again (``_reinstall``). The scale-in and
drain handlers are the scale-in filter's (:class:`dask_context.adaptive.Scaling`).
"""

from __future__ import annotations

import time
from typing import Any

from dask_context import _compat, config
from dask_context._protocol import plugin_name
from dask_context._router_base import RouterBase, logger
from dask_context.errors import UnknownContextError, error_payload
from dask_context.spec import differences
from dask_context.state import WorkerRecord

# worker settings that are the cluster's policy (a worker added later takes them from
# the cluster's workers), as opposed to the worker's own hardware (device, node...)
CLUSTER_SETTINGS = frozenset(
    {"memory-budget", "memory-fraction", "host-memory-budget", "torch-threads", "failed-load-retry"}
)


class HandlersMixin(RouterBase):
    """Client- and worker-facing handlers.

    Owns ``declared`` (names of the contexts of the ``dask-context.contexts``
    setting), ``_unregistered`` (contexts unregistered here, which workers tearing
    them down must not bring back), ``_announced`` (announcements of workers not
    registered yet), the settings workers inherit (``_settings_by_nanny``,
    ``_cluster_settings``), the survey's ``_last_survey`` and ``_surveying``, and
    ``_page`` (whether the dashboard page was shown).
    """

    def _init_handlers(self) -> None:
        self.declared: set[str] = set()
        self._settings_by_nanny: dict[str, dict[str, Any]] = {}
        self._cluster_settings: dict[str, Any] = {}
        # contexts unregistered here: workers still tearing them down must not
        # bring them back by announcing what they hold
        self._unregistered: set[str] = set()
        # announcements of workers that have not registered yet (preloads)
        self._announced: dict[str, dict[str, Any]] = {}
        self._page = False
        self._last_survey = time.monotonic()
        self._surveying = False

    def register(self, specs: list[dict[str, Any]], replace: bool = False) -> dict[str, str]:
        """Scheduler handler: learn the contexts workers can load.

        Returns ``{"error": message}`` if a different spec is registered under a
        name and ``replace`` is false (the client raises ``DuplicateContextError``),
        else, per name, ``"added"``, ``"unchanged"`` (the identical spec is
        registered: nothing happens, warm copies stay), ``"declared"`` (the identical
        spec is declared in the cluster's ``dask-context.contexts`` setting, and its
        workers set it up themselves) or ``"replaced"``.
        """
        status = {}
        for info in specs:
            ctx = self.state.contexts.get(info["name"])
            if ctx is None:
                status[info["name"]] = "added"
            elif ctx.token == info["token"]:
                # declared in the cluster's configuration: workers set it up themselves
                status[info["name"]] = "declared" if ctx.name in self.declared else "unchanged"
            elif replace:
                status[info["name"]] = "replaced"
            else:
                differ = ", ".join(differences(ctx.fields, info["fields"]))
                # answered, not raised: a user's mistake is no error of the scheduler
                # (distributed logs a raising handler's traceback at ERROR)
                return {"error": (
                    f"context {info['name']!r} is already registered with a different "
                    f"{differ}; pass replace=True to replace it (its warm copies are "
                    "dropped and it loads again on first use)"
                )}
        self._show_page()
        for info in specs:
            self._unregistered.discard(info["name"])
            if status[info["name"]] in ("added", "replaced"):
                self._forget_learned(info["name"])
                self.state.add_context(info)
        self.wake(replan=True)
        return status

    def unregister(self, names: list[str]) -> list[str]:
        """Scheduler handler: forget contexts; their queued tasks fail.

        Raises
        ------
        UnknownContextError
            If a name is not registered.
        """
        for name in names:
            if name not in self.state.contexts:
                raise UnknownContextError(name, list(self.state.contexts))
        stimulus_id = f"dask-context-unregister-{time.time()}"
        for name in names:
            waiting = []
            for task in self.state.remove_context(name):
                ts = self.scheduler.tasks.get(task.key)
                if ts is None:
                    continue
                _compat.unpark(ts)
                if ts.state == "no-worker":
                    waiting.append(task.key)
            self._forget_learned(name)
            self._unregistered.add(name)
            error = UnknownContextError(name, list(self.state.contexts))
            _compat.fail(self.scheduler, waiting, error_payload(error), stimulus_id)
        self.wake(replan=True)
        return sorted(self.state.contexts)

    def worker_settings(self, worker: str, nanny: str | None, settings: dict[str, Any]) -> dict[str, Any]:
        """Scheduler handler: the settings a worker should use.

        ``dask.config.set`` around a cluster's creation does not reach workers that a
        nanny restarts or that the cluster adds later (the nanny copies Dask's
        settings shallowly). So a setting a worker leaves at its default takes the
        value its nanny's previous worker had, or, for the settings that are the
        cluster's policy rather than the worker's hardware (memory budget, failed-load
        retry...), the value the cluster's workers had. A worker's own explicit
        settings always win.
        """
        defaults = config.default("worker")
        own = {k: v for k, v in settings.items() if v != defaults.get(k)}
        if own:
            if nanny:
                self._settings_by_nanny[nanny] = own
            self._cluster_settings.update({k: v for k, v in own.items() if k in CLUSTER_SETTINGS})
        inherited = {**{k: v for k, v in self._cluster_settings.items() if k in CLUSTER_SETTINGS},
                     **self._settings_by_nanny.get(nanny or "", {})}
        effective = {**settings, **{k: v for k, v in inherited.items() if k not in own}}
        if effective != settings:
            logger.info("Worker %s takes the settings the cluster was given: %s", worker, inherited)
        return effective

    def worker_joined(self, worker: str, **snapshot: Any) -> None:
        """Scheduler handler: a worker's contexts (its plugins just set one up).

        A worker started with ``--preload dask_context`` announces its contexts
        before it registers with the scheduler: that announcement waits here until
        the worker joins.
        """
        if worker not in self.scheduler.workers:
            self._announced[worker] = snapshot
            return
        self._show_page()
        self._apply(self.state.add_worker(worker, self.scheduler.workers[worker].nthreads), snapshot)
        self.wake(replan=True, worker=worker)

    def _apply(self, w: WorkerRecord, snapshot: dict[str, Any], force: bool = False) -> bool:
        """Make the record of ``w`` what the worker says it has, unless a newer
        snapshot was applied already (see ``WorkerContexts.state``) and not ``force``.

        Returns whether it was applied.
        """
        seq = snapshot.get("seq")
        if seq is None or (seq <= w.seq and not force):
            return False
        w.seq = seq
        st = self.state
        w.budget, w.job = float(snapshot["budget"]), snapshot.get("job")
        for name, info in snapshot["specs"].items():
            # a context registered by hand (its worker plugin alone) becomes known here
            if name not in st.contexts and name not in self._unregistered:
                st.add_context(info)
        st.set_specs(w, {name: info["token"] for name, info in snapshot["specs"].items()})
        w.resident = {c: int(n) for c, n in snapshot["resident"].items() if c in st.contexts}
        w.host = {c: int(n) for c, n in snapshot["host"].items() if c in st.contexts}
        w.loading = {c for c in snapshot["loading"] if c in st.contexts}
        for c in (*w.resident, *w.loading):
            if w.specs.get(c) == st.contexts[c].token:
                st.contexts[c].allowed.add(w.address)
        for c in w.resident:
            w.unchoose(c)
        return True

    def _show_page(self) -> None:
        """Serve the dashboard's Contexts page once dask-context is in use here (a
        scheduler started before ``import dask_context`` lacks it)."""
        if not self._page:
            self._page = True
            try:
                self.observers.show_page()
            except Exception:  # the page is a convenience: routing goes on without it
                logger.warning("Could not add the Contexts page to the dashboard", exc_info=True)

    def file_peers(self, name: str, token: str) -> list[dict[str, str]]:
        """Scheduler handler: workers with a node-local copy of a context's files.

        Returns ``[{"address": ..., "node": ...}]`` for running workers whose copy is
        of the spec with ``token``, warm ones first.
        """
        ctx = self.state.contexts.get(name)
        if ctx is None or ctx.token != token:
            return []
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        peers = [a for a in ctx.staged if a in running]
        peers.sort(key=lambda a: name not in self.state.workers[a].resident)
        return [{"address": a, "node": ctx.staged[a]} for a in peers]

    def file_source(self, name: str, token: str, worker: str) -> bool:
        """Scheduler handler: may ``worker`` copy a context's files from ``files`` now?

        One running worker at a time does; the others wait for its copy and fetch it
        from that worker instead of splitting the shared filesystem's bandwidth. The
        turn ends when that worker reports "staged" or "unstaged", or leaves.
        """
        ctx = self.state.contexts.get(name)
        if ctx is None or ctx.token != token:
            return True
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        if ctx.reader not in running or ctx.reader == worker:
            ctx.reader = worker
            return True
        return False

    async def _survey(self, repair: bool = False) -> None:
        """Make the router's records what the workers say they have.

        With ``repair``, a worker that has been running for a while without a
        context's worker plugin, or with an older spec of it, gets the plugin the
        scheduler holds again (its setup failed, or a message was lost).
        """
        if self._surveying:
            return
        self._surveying = True
        try:
            replies = await self.scheduler.broadcast(msg={"op": "dask_context_state"}, on_error="return")
            for address, reply in replies.items():
                w = self.state.workers.get(address)
                if isinstance(reply, dict) and w is not None:
                    # a repair takes the worker's word even over a record that claims
                    # to be newer: that claim may be what went wrong
                    self._apply(w, reply, force=repair)
            self.wake(replan=True)
            if repair:
                await self._reinstall()
        finally:
            self._surveying = False
            self._last_survey = time.monotonic()

    async def _reinstall(self) -> None:
        """Send context plugins again to running workers whose records lack them."""
        now = time.monotonic()
        for ws in _compat.running_workers(self.scheduler):
            w = self.state.workers.get(ws.address)
            if w is None or now - w.joined < self.stall_margin:
                continue  # its plugins may still be setting up
            for ctx in list(self.state.contexts.values()):
                if w.specs.get(ctx.name) == ctx.token:
                    continue
                sent = _compat.reinstall_plugin(self.scheduler, ws.address, plugin_name(ctx.name))
                if sent is not None:
                    logger.error(
                        "Worker %s lacks the current spec of context %r: installing its "
                        "plugin again", ws.address, ctx.name,
                    )
                    await sent
