import pytest

from dask_context import ContextSpec, DuplicateContextError
from dask_context.spec import check_unique


def loader():
    return {}


def test_spec_fields_are_parsed():
    spec = ContextSpec("m", loader, args=("/p",), kwargs={"k": 1}, device="cuda:1",
                       memory="2 GiB", load_time="1.5s", eager=True)
    assert spec.memory == 2 * 2**30
    assert spec.load_time == 1.5
    assert spec.args == ("/p",) and spec.kwargs == {"k": 1}
    info = spec.info()
    assert {k: info[k] for k in ("name", "memory", "load_time", "token")} == {
        "name": "m", "memory": 2 * 2**30, "load_time": 1.5, "token": spec.token}
    assert set(info["fields"]) == {"loader", "args", "kwargs", "device", "memory", "load_time", "eager", "files"}


def test_tokens_are_deterministic_and_name_what_differs():
    import subprocess
    import sys

    code = "from tests.test_spec import loader; from dask_context import ContextSpec; " \
           "print(ContextSpec('m', loader, args=['/p'], memory='1 GiB').token)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == ContextSpec("m", loader, args=["/p"], memory="1 GiB").token
    from dask_context.spec import differences

    a = ContextSpec("m", loader, args=["/p"])
    b = ContextSpec("m", loader, args=["/q"], eager=True)
    assert differences(a.fields, b.fields) == ["args", "eager"]
    assert differences(a.fields, ContextSpec("m", loader, args=("/p",)).fields) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "", "loader": loader}, ValueError, "non-empty string"),
        ({"name": 3, "loader": loader}, ValueError, "non-empty string"),
        ({"name": "m", "loader": None}, TypeError, "loader of context 'm' is not callable"),
        ({"name": "m", "loader": loader, "device": "gpu"}, ValueError, "device of context 'm'"),
        ({"name": "m", "loader": loader, "memory": -1}, ValueError, "memory of context 'm'"),
        ({"name": "m", "loader": loader, "memory": "lots"}, ValueError, "lots"),
    ],
)
def test_bad_specs_name_the_problem(kwargs, error, match):
    name = kwargs.pop("name")
    loader_ = kwargs.pop("loader")
    with pytest.raises(error, match=match):
        ContextSpec(name, loader_, **kwargs)


def test_duplicates_are_rejected():
    with pytest.raises(DuplicateContextError, match="'a' is given twice"):
        check_unique([ContextSpec("a", loader), ContextSpec("a", loader)])
    with pytest.raises(DuplicateContextError, match="'a' is already registered"):
        check_unique([ContextSpec("a", loader)], known={"a"})
    with pytest.raises(TypeError, match="expected a ContextSpec"):
        check_unique(["a"])


def test_specs_pickle_with_lambdas():
    from distributed.protocol import pickle

    spec = ContextSpec("m", lambda: {"x": 1}, memory=10)
    clone = pickle.loads(pickle.dumps(spec))
    assert clone.loader() == {"x": 1} and clone.memory == 10
