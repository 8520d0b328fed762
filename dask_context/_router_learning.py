"""Which tasks the router routes: marks, and the learning of unmarked tasks.

A task is routed when it is marked (an annotation, or :class:`dask_context.graph.
Routed` in its spec) with a registered context and may run user code, or when its
task group is *learned*: a worker reports that a task of that group called
``get_context(name)`` without a mark (``_learn``), and the rest of the group is
routed from then on, with the tasks Dask had already sent to workers: those that
find the context cold there come back once instead of loading it. A group marked but never asking for its context is unlearned
(``_unlearn``) and handed back to Dask. Advice for users (unknown contexts, pinned
tasks, learned groups) is logged and shown on their clients once (``_warn_once``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dask_context import _compat
from dask_context._protocol import UNROUTED, WARNINGS
from dask_context._router_base import RouterBase, logger
from dask_context.state import RoutedTask

if TYPE_CHECKING:
    from distributed.scheduler import TaskState


#: task states in which a learned group's tasks are routed. A ``processing`` task
#: stays where Dask sent it: it runs there if its worker holds the context warm;
#: on a cold worker it is sent back once (``distributed.Reschedule``, see
#: :func:`dask_context.worker.send_back_unmarked`), and, routed now, the
#: transition hook queues it instead of Dask placing it again. The task whose call
#: taught the router is one of them: its report arrives just before it comes back.
LEARNABLE = frozenset({"released", "waiting", "queued", "no-worker", "processing"})


class LearningMixin(RouterBase):
    """Which tasks are routed.

    Owns ``learned`` (task group -> the context its tasks use; None: they use none,
    or several) and ``_warned`` (tags of the advice already given).
    """

    def _init_learning(self) -> None:
        # task group -> the context its tasks use (None: they use none, or several)
        self.learned: dict[str, str | None] = {}
        self._warned: set[str] = set()

    def _routable(self, ts: TaskState, client: str | None) -> bool:
        if ts.state != "released" or ts.run_spec is None or ts.key in self.state.tasks:
            return False
        if self.learned.get(ts.group.name, "") is None:
            return False  # its group is known not to use the context
        if _compat.user_restricted(ts):
            self._warn_once(
                f"restricted:{ts.group.name}", [client],
                "Tasks of %s are pinned to workers (workers=...): they are not routed",
                ts.group.name,
            )
            return False
        return _compat.may_call_user_code(ts.run_spec)

    def _route(self, ts: TaskState, name: str, annotate: bool = False) -> RoutedTask:
        if annotate:
            # the worker reads the annotation: a failed load sends the task back here
            ts.annotations = {**(ts.annotations or {}), "context": name}
        task = self.state.route(ts.key, name, ts.group.name, ts.prefix.name, ts.priority or (),
                                _compat.resource_request(ts))
        _compat.park(ts)
        return task

    def _known(self, name: Any, client: str | None) -> bool:
        if isinstance(name, str) and name in self.state.contexts:
            return True
        self._warn_once(
            f"unknown:{name!r}", [client],
            "Tasks ask for context %r, which is not registered (known: %s); they run "
            "unrouted and get_context() will raise UnknownContextError",
            name, sorted(self.state.contexts),
        )
        return False

    def _warn_once(self, tag: str, clients: Iterable[str | None], message: str, *args: Any) -> None:
        """Log advice for users once, and show it on the clients whose tasks it concerns."""
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(message, *args)
            self.scheduler.log_event(WARNINGS, {"message": message % args})
            _compat.warn_clients(self.scheduler, {c for c in clients if c}, message % args)

    def _learn(self, group: str, name: str) -> None:
        """Tasks of ``group`` call ``get_context(name)`` without being marked: route them."""
        if name not in self.state.contexts or group in self.learned:
            if self.learned.get(group, name) != name:
                self.learned[group] = None  # several contexts: leave the group alone
            if self.learned.get(group) != name:
                # the task that reported may have been sent back: where Dask places
                # it next, it must run
                self._decline(_compat.tasks_of_group(self.scheduler, group))
            return
        self.learned[group] = name
        tasks = _compat.tasks_of_group(self.scheduler, group)
        self._warn_once(
            f"learned:{group}", _compat.clients_wanting(tasks),
            "Tasks of %s call get_context(%r) but were not marked as needing it; the "
            "rest of them are routed now. Build or compute them inside "
            "dask_context.use(%r) (or use @dask_context.delayed) so that all are.",
            group, name, name,
        )
        pending, pinned = [], []
        for ts in tasks:
            if ts.state not in LEARNABLE or ts.key in self.state.tasks or ts.run_spec is None:
                continue
            if _compat.user_restricted(ts):
                pinned.append(ts)
                continue
            self._route(ts, name, annotate=True)
            if ts.state != "processing":
                pending.append(ts)
        self._decline(pinned)
        self._later(_compat.reschedule, pending)

    def _decline(self, tasks: Iterable[TaskState]) -> None:
        """Mark unmarked ``tasks`` that the router will not route (``UNROUTED``): their
        workers run them where they are, since sent back they would come back unrouted."""
        for ts in tasks:
            if ts.state in LEARNABLE and ts.key not in self.state.tasks:
                ts.annotations = {**(ts.annotations or {}), UNROUTED: True}

    def _unlearn(self, group: str, name: str) -> None:
        """Tasks of ``group`` were marked as needing ``name`` but never asked for it."""
        self.learned[group] = None
        tasks = [t for t in self.state.tasks.values() if t.group == group and t.worker is None]
        self._release([t.key for t in tasks])

    def _forget_learned(self, name: str) -> None:
        for group in [g for g, c in self.learned.items() if c == name]:
            del self.learned[group]
