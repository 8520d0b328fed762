"""Resumable runs: each partition's result is stored durably as soon as it is
computed, and a run started again computes only what is missing.

:func:`resumable` takes a Dask collection (a bag, a ``dask.delayed`` value, a
DataFrame or Series, an array, or a list of these) and a directory (a local or
shared path, or any fsspec URL), and returns the same kind of collection in which
every output partition is *load-or-compute*:

- a partition whose result is in the ledger becomes a task that reads the stored
  file, with no dependency on the tasks that made it, so none of them (and no
  context task) is built, routed or run;
- any other partition becomes a task that takes the computed partition, writes it
  (to a temporary name, then renamed to a name holding its checksum and size) and
  returns it. In a bag it is fused with the task that computes the partition, so
  the result is on disk before the task reports back.

A partition's identity is a hash over the task that makes it and, recursively, its
inputs: the functions (their code, not only their names) and the literal data in
the graph. Dask's keys are not enough on their own: ``dask.delayed`` keys are random
by default, and a module function's key stays the same when its body changes.

The ledger is the listing of ``<path>/parts``: ``<identity>-<checksum>-<size>.<ext>``
files that only ever appear complete (written under ``<path>/tmp`` and renamed).
Reading it is one directory listing. Two runs writing one ledger at once write
distinct temporary files and rename complete files into place, so the ledger never
holds a partial file: at worst a partition is written twice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
import types
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import fsspec
from dask.base import is_dask_collection, tokenize
from dask.core import flatten

from dask_context import config
from dask_context.errors import ContextError

logger = logging.getLogger(__name__)

#: Bumped when the identity of a partition or the file layout changes: entries of
#: an older version are never read (they are computed again).
VERSION = 1
FORMATS = ("auto", "pickle", "parquet")
# callables of these packages are Dask's and Python's own: their code is not
# hashed (a Dask upgrade changes keys anyway); a user's functions are
_LIBRARIES = frozenset({"dask", "distributed", "toolz", "tlz", "cytoolz", "builtins",
                        "operator", "functools", "itertools", "numpy", "pandas", "pyarrow"})


class CorruptPartitionError(ContextError):
    """A stored partition does not match its checksum; it has been moved aside and
    the next run computes it again."""


# ---------------------------------------------------------------- identities
def entry_name(identity: str) -> str:
    """The ledger name of a partition: a short hash of its identity and the version.

    Examples
    --------
    >>> entry_name("abc")
    '2c80a599fd8fc27597a8d9af9726c07e'
    >>> len(entry_name("abd")), entry_name("abd") != entry_name("abc")
    (32, True)
    """
    return hashlib.sha256(f"dask-context-resume/{VERSION}/{identity}".encode()).hexdigest()[:32]


def file_name(entry: str, checksum: str, size: int, ext: str) -> str:
    """The name a complete partition file is stored under.

    Examples
    --------
    >>> file_name("e0d5", "9f86", 120, "pkl")
    'e0d5-9f86-120.pkl'
    >>> parse_file_name("e0d5-9f86-120.pkl")
    ('e0d5', '9f86', 120, 'pkl')
    """
    return f"{entry}-{checksum}-{size}.{ext}"


def parse_file_name(name: str) -> tuple[str, str, int, str] | None:
    """``(entry, checksum, size, ext)`` of a stored file's name, None for others.

    Examples
    --------
    >>> parse_file_name("notes.txt") is None
    True
    """
    stem, dot, ext = name.rpartition(".")
    parts = stem.split("-")
    if not dot or len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2]), ext


def code_digest(code: types.CodeType) -> str:
    """A hash of a code object: its bytecode, constants (nested functions included)
    and names, not where it lives (moving a file changes nothing).

    Examples
    --------
    >>> def f(x): return x + 1
    >>> def g(x): return x + 1
    >>> def h(x): return x + 2
    >>> code_digest(f.__code__) == code_digest(g.__code__) != code_digest(h.__code__)
    True
    """
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        h.update(code_digest(const).encode() if isinstance(const, types.CodeType) else repr(const).encode())
    h.update(repr((code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount)).encode())
    return h.hexdigest()


class _Identities:
    """Identities of the tasks of one graph: a hash of each task's function(s) and
    literal arguments, with every dependency replaced by the dependency's identity
    (a Merkle hash over the graph, independent of key names)."""

    def __init__(self, dsk: Mapping[Hashable, Any]):
        self.dsk = dsk
        self.memo: dict[Hashable, str] = {}
        self.functions: dict[int, tuple[Any, Any]] = {}  # id -> (function, token): keeps it alive

    def of(self, key: Hashable) -> str:
        from dask._task_spec import Alias

        stack = [key]
        while stack:
            k = stack[-1]
            if k in self.memo:
                stack.pop()
                continue
            node = self.dsk.get(k)
            if node is None:  # outside the graph (a persisted collection, a future)
                self.memo[k] = tokenize("external", k)
                stack.pop()
                continue
            deps = node.dependencies if not isinstance(node, Alias) else {node.target}
            missing = [d for d in deps if d not in self.memo]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            self.memo[k] = tokenize(self.canon(node))
        return self.memo[key]

    def canon(self, obj: Any, depth: int = 0) -> Any:
        from dask._task_spec import Alias, DataNode, Task, TaskRef

        if depth > 50:
            return obj
        if isinstance(obj, Alias):
            return ("ref", self._ref(obj.target))
        if isinstance(obj, TaskRef):
            return ("ref", self._ref(obj.key))
        if isinstance(obj, DataNode):
            return ("data", self.canon(obj.value, depth + 1) if callable(obj.value) else obj.value)
        if isinstance(obj, Task):
            has_subgraph = getattr(obj, "has_subgraph", None)
            if callable(has_subgraph) and has_subgraph():
                # a fused task: its inner tasks by inner key, in a stable order
                inner = obj.args[0]
                return ("fused", obj.args[1] if len(obj.args) > 1 else None,
                        sorted((repr(k), self.canon(v, depth + 1)) for k, v in inner.items()))
            return ("task", type(obj).__name__, self.canon(obj.func, depth + 1),
                    tuple(self.canon(a, depth + 1) for a in obj.args),
                    tuple(sorted((k, self.canon(v, depth + 1)) for k, v in obj.kwargs.items())))
        if isinstance(obj, (list, tuple)) and len(obj) <= 1000:
            return (type(obj).__name__, tuple(self.canon(v, depth + 1) for v in obj))
        if isinstance(obj, dict) and len(obj) <= 1000:
            return ("dict", tuple((repr(k), self.canon(v, depth + 1)) for k, v in obj.items()))
        if isinstance(obj, functools.partial):
            return ("partial", self.canon(obj.func, depth + 1), self.canon(obj.args, depth + 1),
                    self.canon(obj.keywords, depth + 1))
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        return obj

    def _ref(self, key: Hashable) -> str:
        # inner keys of a fused task are not in the graph: their names stand for them
        return self.memo[key] if key in self.memo else tokenize("key", key)

    def _function(self, f: types.FunctionType) -> Any:
        seen = self.functions.get(id(f))
        if seen is not None:
            return seen[1]
        module = getattr(f, "__module__", None) or ""
        if module.partition(".")[0] in _LIBRARIES:
            token: Any = ("function", module, f.__qualname__)
        else:
            # by its code, not by pickling it: pickle records a module's function by
            # name only (an edited body would be served stale), and cloudpickle copies
            # the globals it reads (a counter it updates would change it every run)
            cells = []
            for cell in f.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    cells.append(None)
            token = ("function", module, f.__qualname__, code_digest(f.__code__),
                     tokenize(f.__defaults__, f.__kwdefaults__, cells))
        self.functions[id(f)] = (f, token)
        return token


# ---------------------------------------------------------------- encoding
def _encode(value: Any, fmt: str) -> tuple[bytes, str]:
    """Serialise a partition: ``(bytes, extension)``."""
    if fmt in ("auto", "parquet"):
        data = _to_parquet(value)
        if data is not None:
            return data, "parquet"
        if fmt == "parquet":
            raise TypeError(
                f"format='parquet' stores pandas DataFrames and Series and lists of flat "
                f"records (dicts) that round-trip through Parquet unchanged; this partition "
                f"is a {type(value).__name__}: use format='auto' or 'pickle'"
            )
    import cloudpickle

    return cloudpickle.dumps(value, protocol=5), "pkl"


def _to_parquet(value: Any) -> bytes | None:
    """Parquet bytes of a pandas object or a list of records, None when it does not
    round-trip unchanged (or pyarrow is missing)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    kind: dict[str, Any]
    try:
        if isinstance(value, list):
            if not all(type(r) is dict and all(isinstance(k, str) for k in r) for r in value):
                return None
            table = pa.Table.from_pylist(value)
            if not same(table.to_pylist(), value):
                return None  # e.g. ints and floats in one field, tuples, missing fields
            kind = {"kind": "records"}
        else:
            pd = _pandas()
            if pd is None:
                return None
            if isinstance(value, pd.Series):
                if not _json_name(value.name):
                    return None
                kind, frame = {"kind": "series", "name": value.name}, value.to_frame("__series__")
            elif isinstance(value, pd.DataFrame):
                kind, frame = {"kind": "frame"}, value
            else:
                return None
            if not all(isinstance(c, str) for c in frame.columns):
                return None
            table = pa.Table.from_pandas(frame, preserve_index=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    meta = {**(table.schema.metadata or {}), b"dask_context.resume": json.dumps(kind).encode()}
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), out)
    return out.getvalue()


def _decode(data: bytes, ext: str) -> Any:
    if ext == "pkl":
        import pickle

        return pickle.loads(data)
    if ext == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        kind = json.loads((table.schema.metadata or {}).get(b"dask_context.resume", b'{"kind": "frame"}'))
        if kind["kind"] == "records":
            return table.to_pylist()
        frame = table.to_pandas()
        if kind["kind"] == "series":
            return frame["__series__"].rename(kind["name"])
        return frame
    raise ValueError(f"unknown partition file type {ext!r}")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _json_name(name: Any) -> bool:
    return name is None or isinstance(name, (str, int, float, bool))


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1 != 1.0`` here).

    Examples
    --------
    >>> same([{"a": 1}], [{"a": 1}]), same([{"a": 1}], [{"a": 1.0}]), same((1,), [1])
    (True, False, False)
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) or (a != a and b != b)  # NaN


def checksum(data: bytes) -> str:
    """The checksum stored in a partition's file name (128 bits of SHA-256).

    Examples
    --------
    >>> checksum(b"")
    'e3b0c44298fc1c149afbf4c8996fb924'
    """
    return hashlib.sha256(data).hexdigest()[:32]


# ---------------------------------------------------------------- worker side
_made_dirs: set[tuple[int, str]] = set()


def store(value: Any, fs: Any, root: str, entry: str, fmt: str) -> Any:
    """Task: write a computed partition atomically, then return it unchanged.

    The bytes go to a temporary file under ``<root>/tmp`` first (fsynced on local
    filesystems), which is then renamed to ``<root>/parts/<entry>-<checksum>-<size>``:
    a partition file exists only complete, so a kill at any point leaves either no
    entry or a complete one.
    """
    start = time.perf_counter()
    if isinstance(value, Iterator):
        # a bag's partition may be a lazy map or filter: store (and return) its items,
        # not an iterator that would call the task's function again when read
        value = list(value)
    data, ext = _encode(value, fmt)
    name = file_name(entry, checksum(data), len(data), ext)
    tmp = f"{root}/tmp/{entry}-{uuid.uuid4().hex}.{ext}"
    if (id(fs), root) not in _made_dirs:
        _make_dirs(fs, root)
    try:
        _write_and_rename(fs, data, tmp, f"{root}/parts/{name}")
    except FileNotFoundError:  # the directories were removed since this process made them
        _make_dirs(fs, root)
        _write_and_rename(fs, data, tmp, f"{root}/parts/{name}")
    logger.debug("Stored partition %s (%d bytes) in %.3fs", name, len(data), time.perf_counter() - start)
    return value


def _make_dirs(fs: Any, root: str) -> None:
    for sub in ("tmp", "parts"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    _made_dirs.add((id(fs), root))


def _write_and_rename(fs: Any, data: bytes, tmp: str, final: str) -> None:
    with fs.open(tmp, "wb") as f:
        f.write(data)
        if config.get("resume.fsync") and _is_local(fs):
            f.flush()
            os.fsync(f.fileno())
    fs.mv(tmp, final)


def load(fs: Any, root: str, name: str) -> Any:
    """Task: read a stored partition and check it against the checksum and size in
    its name.

    Raises
    ------
    CorruptPartitionError
        If the file does not match; it is moved to ``<root>/corrupt`` first, so the
        next run computes the partition again.
    """
    path = f"{root}/parts/{name}"
    data = fs.cat_file(path)
    parsed = parse_file_name(name)
    assert parsed is not None
    _, expected, size, ext = parsed
    if len(data) != size or checksum(data) != expected:
        _quarantine(fs, root, name)
        raise CorruptPartitionError(
            f"stored partition {path} does not match its checksum ({len(data)} bytes, "
            f"{size} expected); it was moved to {root}/corrupt and the next run computes it again"
        )
    return _decode(data, ext)


def _quarantine(fs: Any, root: str, name: str) -> None:
    try:
        fs.makedirs(f"{root}/corrupt", exist_ok=True)
        fs.mv(f"{root}/parts/{name}", f"{root}/corrupt/{name}")
    except FileNotFoundError:
        pass  # another run moved it already


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


# ---------------------------------------------------------------- the ledger
@dataclasses.dataclass
class Stored:
    """A complete-looking partition file in the ledger."""

    name: str
    checksum: str
    size: int
    actual_size: int | None


class Ledger:
    """The stored partitions under one directory (a path or any fsspec URL).

    Parameters
    ----------
    path
        The run's directory: ``/shared/runs/verdicts``, ``s3://bucket/runs/verdicts``.
    storage_options
        Passed to fsspec for remote filesystems (credentials, endpoints).
    """

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.path = str(path)

    def read(self) -> dict[str, Stored]:
        """``{entry: Stored}`` from one listing of ``parts/`` (with sizes)."""
        try:
            listing = self.fs.ls(f"{self.root}/parts", detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, Stored] = {}
        for info in listing:
            name = info["name"].rstrip("/").rpartition("/")[2]
            parsed = parse_file_name(name)
            if parsed is None:
                continue
            entry, digest, size, _ = parsed
            found = Stored(name, digest, size, info.get("size"))
            # two runs may have stored different (equally complete) results of a
            # non-deterministic task: keep one, the same one every time
            if entry not in out or name < out[entry].name:
                out[entry] = found
        return out

    def verify(self, stored: Stored) -> bool:
        """Read one stored file and compare it with its checksum."""
        try:
            data = self.fs.cat_file(f"{self.root}/parts/{stored.name}")
        except FileNotFoundError:
            return False
        return len(data) == stored.size and checksum(data) == stored.checksum

    def quarantine(self, stored: Stored) -> None:
        """Move a torn or corrupt file out of the ledger, to ``corrupt/``."""
        _quarantine(self.fs, self.root, stored.name)


@dataclasses.dataclass
class Plan:
    """What a resumed run reads and what it computes.

    Attributes
    ----------
    done
        Output keys read from the ledger.
    todo
        Output keys computed (and stored) in this run.
    torn
        Stored files found torn or corrupt (moved to ``corrupt/``); their
        partitions are among ``todo``.
    entries
        ``{output key: ledger entry}``.
    seconds
        Time spent building the plan (identities and the ledger listing).
    """

    done: list[Hashable]
    todo: list[Hashable]
    torn: list[str]
    entries: dict[Hashable, str]
    seconds: float
    stored: dict[Hashable, Stored] = dataclasses.field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        torn = f", {len(self.torn)} torn or corrupt (computed again)" if self.torn else ""
        return (f"{len(self.done)} of {len(self.done) + len(self.todo)} partitions stored, "
                f"{len(self.todo)} to compute{torn}")


# ---------------------------------------------------------------- collections
def _graph_and_keys(collection: Any) -> tuple[Any, list[Hashable], Any]:
    """``(graph, output keys, collection)``; a DataFrame is optimised first, so that
    its keys are those its computation runs."""
    if _is_dataframe(collection):
        collection = collection.optimize()
    return collection.__dask_graph__(), list(flatten(collection.__dask_keys__())), collection


def _is_dataframe(collection: Any) -> bool:
    return type(collection).__module__.startswith("dask.dataframe")


def plan(collection: Any, path: str, *, storage_options: Mapping[str, Any] | None = None,
         verify: str | None = None, token: Any = None) -> Plan:
    """Which partitions of ``collection`` the ledger at ``path`` holds, without
    changing anything but moving torn files aside. See :func:`resumable`."""
    return _plan(collection, Ledger(path, storage_options), verify, token)[0]


def _plan(collection: Any, ledger: Ledger, verify: str | None, token: Any,
          stored_all: dict[str, Stored] | None = None) -> tuple[Plan, Any, Any]:
    from dask._task_spec import convert_legacy_graph
    from dask.utils import ensure_dict

    verify = config.get("resume.verify", verify)
    if verify not in ("size", "checksum"):
        raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}")
    start = time.perf_counter()
    graph, keys, collection = _graph_and_keys(collection)
    identities = _Identities(convert_legacy_graph(ensure_dict(graph)))
    extra = tokenize(token) if token is not None else ""
    entries = {k: entry_name(identities.of(k) + extra) for k in keys}
    if stored_all is None:
        stored_all = ledger.read()
    done, todo, torn, stored = [], [], [], {}
    for key in keys:
        found = stored_all.get(entries[key])
        ok = found is not None and found.actual_size in (None, found.size)
        if ok and verify == "checksum":
            ok = ledger.verify(found)
        if found is not None and not ok:
            logger.warning("Stored partition %s/parts/%s is torn or corrupt: computing it again",
                           ledger.root, found.name)
            torn.append(found.name)
            ledger.quarantine(found)
        if ok:
            done.append(key)
            stored[key] = found
        else:
            todo.append(key)
    p = Plan(done, todo, torn, entries, time.perf_counter() - start, stored)
    return p, graph, collection


def resumable(collection: Any, path: str, *, storage_options: Mapping[str, Any] | None = None,
              format: str = "auto", verify: str | None = None, token: Any = None) -> Any:
    """The same collection, made resumable: each partition is stored under ``path``
    as soon as it is computed, and partitions stored by an earlier run are read
    instead of computed.

    Parameters
    ----------
    collection
        A bag, a ``dask.delayed`` value, a DataFrame or Series, an array, or a list
        or tuple of these (one ledger read for all).
    path
        The run's directory, local, shared, or any fsspec URL (``s3://...``). Runs of
        different pipelines may share it: entries are named by partition identity.
    storage_options
        fsspec options for remote filesystems.
    format
        ``"auto"`` (default): Parquet for pandas partitions and for bag partitions
        of flat records that round-trip through Parquet unchanged (needs pyarrow),
        pickle (cloudpickle) for everything else; ``"parquet"``: Parquet or an
        error; ``"pickle"``: always pickle.
    verify
        How stored files are checked before the run: ``"size"`` (from the listing,
        default ``dask-context.resume.verify``) or ``"checksum"`` (reads every file).
        Files are always checked against their checksum when read.
    token
        Anything tokenizable mixed into every partition's identity: bump it when
        something the graph cannot see changes (a model's weights, a helper
        function called by the task function).

    Returns
    -------
    A collection of the same kind (a list or tuple for a list or tuple), to be
    computed or persisted as usual. Its computation builds and routes context tasks
    only for partitions not yet stored.

    Examples
    --------
    .. code-block:: python

        with dask_context.use("verifier"):
            verdicts = claims.map_partitions(verify)
        verdicts = dask_context.resumable(verdicts, "/shared/runs/verdicts")
        verdicts.compute()  # run it again after a kill: only the rest is computed
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    ledger = Ledger(path, storage_options)
    if isinstance(collection, (list, tuple)):
        stored_all = ledger.read()
        out = [_resumable(c, ledger, format, verify, token, stored_all) for c in collection]
        return type(collection)(out)
    return _resumable(collection, ledger, format, verify, token, None)


def _resumable(collection: Any, ledger: Ledger, fmt: str, verify: str | None, token: Any,
               stored_all: dict[str, Stored] | None) -> Any:
    from dask._task_spec import Task, TaskRef
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    if not is_dask_collection(collection):
        raise TypeError(f"resumable() takes a Dask collection, got {type(collection).__name__}")
    p, graph, collection = _plan(collection, ledger, verify, token, stored_all)
    logger.info("Resuming %s: %s (ledger read in %.3fs)", ledger.path, p, p.seconds)
    keys = p.done + p.todo
    name = _name_of(keys[0]) if keys else "empty"
    new_name = f"resume-{tokenize(name, ledger.path, fmt, sorted(p.entries.values()), p.done)}"

    def rename(key: Hashable) -> Hashable:
        return (new_name, *key[1:]) if isinstance(key, tuple) else new_name

    tasks: dict[Hashable, Any] = {}
    for key in p.done:
        tasks[rename(key)] = Task(rename(key), load, ledger.fs, ledger.root, p.stored[key].name)
    for key in p.todo:
        tasks[rename(key)] = Task(rename(key), store, TaskRef(key), ledger.fs, ledger.root,
                                  p.entries[key], fmt)
    if _is_dataframe(collection):
        return _rebuild_dataframe(collection, graph, tasks, p, rename, new_name)
    if isinstance(graph, HighLevelGraph):
        upstream = graph.cull(set(p.todo)) if p.todo else None
    else:
        upstream = HighLevelGraph.from_collections("resume-upstream", dict(graph)).cull(set(p.todo)) if p.todo else None
    layer = MaterializedLayer(tasks)
    layer.annotations = None  # read and write tasks are never routed, even when built in use()
    layers = dict(upstream.layers) if upstream is not None else {}
    deps = {k: set(v) for k, v in upstream.dependencies.items()} if upstream is not None else {}
    layers[new_name] = layer
    deps[new_name] = set(upstream.layers) if upstream is not None else set()
    hlg = HighLevelGraph(layers, deps)
    if isinstance(collection, Delayed):  # its layer is named after the key only by default
        return Delayed(rename(collection.key), hlg, getattr(collection, "_length", None), layer=new_name)
    rebuild, args = collection.__dask_postpersist__()
    return rebuild(hlg, *args, rename={name: new_name})


def _rebuild_dataframe(collection: Any, graph: Any, tasks: dict[Hashable, Any], p: Plan,
                       rename: Callable[[Hashable], Hashable], new_name: str) -> Any:
    from dask._task_spec import cull
    from dask.dataframe.dask_expr._collection import from_graph
    from dask.utils import ensure_dict

    dsk = ensure_dict(graph)
    if p.todo:
        from dask._task_spec import convert_legacy_graph

        dsk = cull(convert_legacy_graph(dsk), set(p.todo))
        tasks = {**dsk, **tasks}
    keys = [rename(k) for k in flatten(collection.__dask_keys__())]
    return from_graph(tasks, collection._meta, collection.divisions, keys, "resume")


def _name_of(key: Hashable) -> Any:
    return key[0] if isinstance(key, tuple) else key


def stored_files(collection: Any, path: str, *, storage_options: Mapping[str, Any] | None = None,
                 token: Any = None) -> list[str | None]:
    """The stored file of each output partition of ``collection`` in order (None for
    those not stored yet): e.g. to read a finished run's Parquet files with another
    tool."""
    ledger = Ledger(path, storage_options)
    p = _plan(collection, ledger, "size", token)[0]
    return [f"{ledger.root}/parts/{p.stored[k].name}" if k in p.stored else None
            for k in p.entries]
