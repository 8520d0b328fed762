"""Names the scheduler and worker sides share.

Kept apart so that neither side imports the other for them: the worker plugin
(:mod:`dask_context.worker`), the file stager (:mod:`dask_context.staging`), the
router (:mod:`dask_context.scheduler`) and its observers all import them from here.
"""

#: topic of the events workers send the router with ``Worker.log_event``
TOPIC = "dask-context"

#: scheduler metadata key under which the router says it runs
ROUTER_METADATA = ["dask-context", "router"]

#: name of the router's scheduler plugin (``Scheduler.plugins[ROUTER_NAME]``)
ROUTER_NAME = "dask-context"


def plugin_name(context: str) -> str:
    """Name of the worker plugin of ``context`` (``Scheduler.worker_plugins`` key).

    >>> plugin_name("verifier")
    'dask-context-verifier'
    """
    return f"dask-context-{context}"


#: topic of the warnings the router has for users; register() shows them on the client
WARNINGS = "dask-context-warnings"

#: task annotation the router sets on unmarked tasks it will not route (a group
#: asking for several contexts, an unknown context, tasks pinned with workers=):
#: their workers run them where they are instead of sending them back
UNROUTED = "dask-context-unrouted"
