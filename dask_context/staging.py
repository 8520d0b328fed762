"""Node-local copies of a context's files, fetched from warm peers (issue 11.2).

Interface used by :mod:`dask_context.worker` (the implementation is being written):

- ``Stager(worker, node, root)``: one per worker.
- ``Stager.stage(spec) -> str``: runs in a task thread before the loader; returns the
  local directory holding ``spec.files``.
- ``Stager.handlers() -> dict``: worker handlers that serve files to peers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Worker

    from dask_context.spec import ContextSpec


class Stager:
    """Stages ``ContextSpec.files`` node-locally (for now: the spec's own path)."""

    def __init__(self, worker: Worker, node: str, root: str):
        self.worker = worker
        self.node = node
        self.root = root

    def stage(self, spec: ContextSpec) -> str:
        return spec.files

    def handlers(self) -> dict[str, Any]:
        return {}
