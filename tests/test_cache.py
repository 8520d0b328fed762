import threading
import time

import pytest
import torch
from dask.sizeof import sizeof

from dask_context import ContextSpec, ContextTooLargeError, UnknownContextError
from dask_context.cache import ContextCache, place
from tests.loaders import blob, broken


def make_cache(**kwargs):
    events = []
    cache = ContextCache(emit=events.append, **kwargs)
    return cache, events


def actions(events, action):
    return [e["context"] for e in events if e["action"] == action]


def test_concurrent_first_use_loads_once():
    cache, events = make_cache()
    cache.add(ContextSpec("m", blob, args=["m"], kwargs={"seconds": 0.2}))
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("m"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1
    assert actions(events, "loaded") == ["m"]
    loaded = next(e for e in events if e["action"] == "loaded")
    assert loaded["seconds"] >= 0.2 and loaded["nbytes"] >= 1000


def test_lru_eviction_keeps_budget():
    cache, events = make_cache(budget=3000)
    for name in "abc":
        cache.add(ContextSpec(name, blob, args=[name], memory=1000))
    cache.get("a")
    cache.get("b")
    cache.get("a")  # b is now least recently used
    cache.get("c")
    assert set(cache.resident_bytes()) == {"a", "c"}
    assert actions(events, "evicted") == ["b"]
    assert cache.used_bytes() <= 3000


def test_contexts_in_use_by_running_tasks_are_not_evicted():
    running = {"task-1"}
    cache, events = make_cache(budget=3000, running=lambda: running)
    for name in "abc":
        cache.add(ContextSpec(name, blob, args=[name], memory=1000))
    cache.get("a", key="task-1")
    cache.get("b", key="task-2")
    cache.get("c", key="task-3")
    assert actions(events, "evicted") == ["b"]


def test_measured_size_beyond_estimate_triggers_eviction():
    cache, events = make_cache(budget=10_000)
    cache.add(ContextSpec("small", blob, args=["small"], kwargs={"nbytes": 4000}))
    cache.add(ContextSpec("liar", blob, args=["liar"], kwargs={"nbytes": 8000}, memory=10))
    cache.get("small")
    cache.get("liar")
    assert actions(events, "evicted") == ["small"]


def test_too_large_context_is_a_clear_error():
    cache, events = make_cache(budget=1000)
    cache.add(ContextSpec("big", blob, args=["big"], kwargs={"nbytes": 5000}))
    with pytest.raises(ContextTooLargeError, match=r"context 'big' takes 5\.\d+ kiB once loaded, more than the memory budget of this worker \(0\.98 kiB\)"):
        cache.get("big")
    assert cache.resident_bytes() == {}
    failed = [e for e in events if e["action"] == "failed"]
    assert [e["context"] for e in failed] == ["big"] and isinstance(failed[0]["exc"], ContextTooLargeError)


def test_a_declared_size_is_an_estimate_the_measurement_replaces():
    # declared 200x too large: still tried, and it fits
    cache, events = make_cache(budget=10_000)
    cache.add(ContextSpec("small", blob, args=["small"], kwargs={"nbytes": 100}, memory=2_000_000))
    cache.add(ContextSpec("other", blob, args=["other"], kwargs={"nbytes": 100}))
    cache.get("other")
    assert cache.get("small")["name"] == "small"
    # declared too large, measured small: "other" had to make room before the load
    # (the estimate said so), but the measurement is what counts from now on
    loaded = [e for e in events if e["action"] == "loaded"]
    assert loaded[-1]["nbytes"] < 1000
    cache.evict("small")
    cache.get("other")
    cache.get("small")
    assert set(cache.resident_bytes()) == {"small", "other"}


def test_unknown_context_names_the_known_ones():
    cache, _ = make_cache()
    cache.add(ContextSpec("a", blob, args=["a"]))
    with pytest.raises(UnknownContextError, match="unknown context 'zzz': registered contexts are 'a'"):
        cache.get("zzz")


def test_failed_load_keeps_traceback_and_is_not_retried_at_once():
    cache, events = make_cache(failed_load_retry=0.3)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            return broken("disk on fire")
        return {"ok": True}

    cache.add(ContextSpec("f", flaky))
    with pytest.raises(OSError, match="disk on fire") as first:
        cache.get("f")
    assert "broken" in {f.name for f in first.traceback}
    assert any("loading context 'f' failed" in n for n in first.value.__notes__)
    with pytest.raises(OSError, match="disk on fire"):
        cache.get("f")  # remembered: the loader is not called again
    assert len(calls) == 1
    assert actions(events, "failed") == ["f"]
    time.sleep(0.35)
    assert cache.get("f") == {"ok": True}
    assert len(calls) == 2


def test_loader_gets_device_when_it_asks_for_it():
    cache, _ = make_cache(device="cpu")

    def with_device(device):
        return {"device": device}

    cache.add(ContextSpec("d", with_device))
    assert cache.get("d") == {"device": "cpu"}


def test_torch_modules_are_placed_and_sized():
    module = torch.nn.Linear(100, 10)
    assert sizeof(module) == (100 * 10 + 10) * 4
    placed = place((module, {"t": torch.ones(3)}), "cpu")
    assert placed[0] is module and placed[1]["t"].device.type == "cpu"
    cache, events = make_cache()
    cache.add(ContextSpec("lin", torch.nn.Linear, args=[100, 10]))
    cache.get("lin")
    assert next(e for e in events if e["action"] == "loaded")["nbytes"] == 4040


def test_eager_load_in_background_and_clear():
    cache, events = make_cache()
    cache.add(ContextSpec("e", blob, args=["e"], kwargs={"seconds": 0.1}, eager=True))
    cache.load_in_background("e").join(5)
    assert actions(events, "loaded") == ["e"]
    cache.clear()
    assert cache.resident_bytes() == {} and actions(events, "evicted") == ["e"]


def test_replacing_and_removing_specs_frees_memory():
    cache, _ = make_cache()
    cache.add(ContextSpec("r", blob, args=["v1"]))
    assert cache.get("r")["name"] == "v1"
    cache.add(ContextSpec("r", blob, args=["v2"]))
    assert cache.get("r")["name"] == "v2"
    cache.remove("r")
    assert cache.names() == [] and cache.resident_bytes() == {}
