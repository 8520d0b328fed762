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
        ({"name": "m", "loader": loader, "load_time": "-5"}, ValueError, "load_time of context 'm'"),
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


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("memory", "5 parsecs",
         "memory of context 'x' must be a size in bytes or like '2 GiB', got '5 parsecs'"),
        ("memory", "", "memory of context 'x' must be a size in bytes or like '2 GiB', got ''"),
        ("memory", True, "memory of context 'x' must be a size in bytes or like '2 GiB', got True"),
        ("memory", [1], "memory of context 'x' must be a size in bytes or like '2 GiB', got [1]"),
        ("memory", float("nan"),
         "memory of context 'x' must be a size in bytes or like '2 GiB', got nan"),
        ("memory", -1, "memory of context 'x' must be >= 0, got -1"),
        ("load_time", "5 parsecs",
         "load_time of context 'x' must be a duration in seconds or like '30s', got '5 parsecs'"),
        ("load_time", "5min",
         "load_time of context 'x' must be a duration in seconds or like '30s', got '5min'"),
        ("load_time", "", "load_time of context 'x' must be a duration in seconds or like '30s', got ''"),
        ("load_time", [1],
         "load_time of context 'x' must be a duration in seconds or like '30s', got [1]"),
        ("load_time", float("inf"),
         "load_time of context 'x' must be a duration in seconds or like '30s', got inf"),
        ("load_time", -1, "load_time of context 'x' must be >= 0, got -1"),
    ],
)
def test_bad_sizes_and_durations_name_the_context_and_field(field, value, expected):
    with pytest.raises(ValueError) as info:
        ContextSpec("x", loader, **{field: value})
    assert str(info.value) == expected
    # never the parser's own KeyError or message
    assert type(info.value) is ValueError


def test_sizes_and_durations_parse_as_before():
    spec = ContextSpec("x", loader, memory="1e3", load_time="5 minutes")
    assert (spec.memory, spec.load_time) == (1000, 300)
    spec = ContextSpec("x", loader, memory=2.5e9, load_time=2)
    assert (spec.memory, spec.load_time) == (2_500_000_000, 2)
    assert ContextSpec("x", loader, memory=0, load_time=0).memory == 0


def test_a_declared_context_with_a_bad_field_names_the_setting_the_context_and_field():
    from dask_context.errors import SettingError
    from dask_context.spec import from_config

    entry = {"name": "x", "loader": "builtins:dict", "load_time": "5 parsecs"}
    with pytest.raises(SettingError) as info:
        from_config(entry, "dask-context.contexts[0]")
    assert str(info.value) == (
        "dask-context.contexts[0] ('x'): load_time of context 'x' must be a duration in "
        "seconds or like '30s', got '5 parsecs'"
    )
