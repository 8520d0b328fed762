"""DataFrames built inside ``use()`` are routed like bags, with no annotation warning.

dask.dataframe (query planning) drops annotations; the mark travels on the user's
function (``graph.Routed``) and the router finds it in each task's spec.
"""

from __future__ import annotations

import warnings
from collections import Counter

import dask
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
dd = pytest.importorskip("dask.dataframe")


import dask_context as dc  # noqa: E402
from dask_context import graph  # noqa: E402
from dask_context.factcheck import make_claims  # noqa: E402
from dask_context.models import load_causal_lm  # noqa: E402
from tests.loaders import blob, tag_with_context, verdict_columns  # noqa: E402

IGNORED = "Annotations will be ignored when using query-planning"
# the columns verdict_columns returns, with the dtypes pandas infers for them
META = pd.DataFrame({"claim": ["c"], "verdict": ["v"], "logprob": [0.0]}).iloc[:0]


@pytest.fixture
def warn_again(monkeypatch):
    """dask.dataframe warns about annotations once per process: let it warn here."""
    from dask.dataframe.dask_expr import _collection

    monkeypatch.setattr(_collection, "_WARN_ANNOTATIONS", True)


def marks(collection) -> Counter:
    """``{context or None: number of tasks}`` of the optimised graph."""
    tasks = collection.expr.optimize().__dask_graph__()
    return Counter(graph.marked_context(t) for t in tasks.values())


def frame(n=40, npartitions=4):
    return dd.from_pandas(pd.DataFrame({"x": range(n)}), npartitions=npartitions)


def double(part):
    return part.assign(y=part.x * 2)


def test_functions_of_a_frame_built_inside_use_are_marked_without_warning(warn_again):
    df = frame()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with dc.use("verifier"):
            mapped = df.map_partitions(double)
            applied = df.x.apply(lambda v: v + 1, meta=("x", "int64"))
            mapped_rows = df.x.map(str, meta=("x", object))  # a builtin: Dask's own, not marked
    # one task per partition runs the user's function: those are marked (from_pandas's
    # partitions are data, not marked)
    assert marks(mapped)["verifier"] == 4
    assert marks(applied)["verifier"] == 4
    assert "verifier" not in marks(mapped_rows)
    # built outside use(): nothing marked, and the results are the same
    assert "verifier" not in marks(df.map_partitions(double))
    assert mapped.compute(scheduler="sync").y.tolist() == [2 * i for i in range(40)]
    assert applied.compute(scheduler="sync").tolist() == list(range(1, 41))
    # steps after the marked function, built outside use(), run unmarked
    assert marks(mapped.y.sum())["verifier"] == 4


def test_other_annotations_still_get_dasks_warning(warn_again):
    with pytest.warns(UserWarning, match=IGNORED), dask.annotate(retries=2):
        frame().map_partitions(double)


def test_parquet_pipeline_is_routed_end_to_end(client, model_dir, tmp_path, warn_again, recwarn):
    claims = make_claims(96)
    pd.DataFrame({"claim": claims}).to_parquet(tmp_path / "claims.parquet", row_group_size=8)
    dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)]))

    source = dd.read_parquet(tmp_path / "claims.parquet", split_row_groups=True)
    npartitions = source.npartitions
    assert npartitions == 12
    with dc.use("verifier"):
        # meta given: otherwise dask-expr would call the function here, on the client
        verdicts = source.map_partitions(verdict_columns, meta=META)
    # computed outside the block: still routed
    verdicts.to_parquet(tmp_path / "verdicts")

    assert not [w for w in recwarn.list if IGNORED in str(w.message)]
    out = pd.read_parquet(tmp_path / "verdicts")
    assert sorted(out.claim) == sorted(claims)
    assert set(out.verdict) <= {"SUPPORTED", "REFUTED", "NOT ENOUGH INFO"}
    info = dc.report(client)["contexts"]["verifier"]
    loaded = Counter(
        e["worker"] for _, e in client.get_events("dask-context")
        if e["action"] == "loaded" and e["context"] == "verifier"
    )
    # every partition's task was routed and found the model warm; one load per worker used
    assert info["tasks"] == npartitions and info["hits"] == npartitions
    assert info["loads"] == len(loaded) <= 2 and set(loaded.values()) == {1}


def test_series_apply_is_routed(client, warn_again, recwarn):
    dc.register(client, dc.ContextSpec("blob", blob, args=["blob"]))
    df = frame(n=30, npartitions=6)
    with dc.use("blob"):
        tagged = df.x.apply(tag_with_context, args=("blob",), meta=("x", object))
    assert client.compute(tagged).result().tolist() == [f"blob:{i}" for i in range(30)]
    assert not [w for w in recwarn.list if IGNORED in str(w.message)]
    info = dc.report(client)["contexts"]["blob"]
    assert info["tasks"] == 6 and info["hits"] == 6
