import sys
import threading
import time

import pytest
import torch
from dask.sizeof import sizeof

from dask_context import ContextCycleError, ContextSpec, ContextTooLargeError, UnknownContextError
from dask_context.cache import ContextCache
from dask_context.tiers import place
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


def waiting(thread, deadline=10.0):
    """Poll until ``thread`` blocks waiting (a lock or a condition) or ends."""
    end = time.monotonic() + deadline
    while thread.is_alive() and time.monotonic() < end:
        frame = sys._current_frames().get(thread.ident)
        if frame is not None and frame.f_code.co_name == "wait":
            return
        time.sleep(0.01)


#: the cache the loaders below ask for other contexts (as get_context does on a worker)
CACHES: dict[str, ContextCache] = {}


def uses(other, then=None):
    """Loader: the context ``other``, asked for from inside this load, once ``then``
    (an event's name) is set."""
    if then is not None:
        EVENTS[then].wait()
    return {"name": "user", "of": CACHES["cache"].get(other)["name"]}


EVENTS: dict[str, threading.Event] = {}


def test_a_loader_uses_another_context_while_a_thread_waits_for_that_one():
    # a model's loader asks for its tokenizer while a task's thread waits for the
    # tokenizer's turn, behind the model's first load (which loads alone)
    cache, events = make_cache()
    CACHES["cache"], EVENTS["asks"] = cache, threading.Event()
    cache.add(ContextSpec("tok", blob, args=["tok"]))
    cache.add(ContextSpec("model", uses, args=["tok", "asks"]))
    got = {}
    loading = threading.Thread(target=lambda: got.update(model=cache.get("model")))
    loading.start()
    while "model" not in cache.loading():
        time.sleep(0.01)
    waiter = threading.Thread(target=lambda: got.update(tok=cache.get("tok")))
    waiter.start()
    waiting(waiter)
    EVENTS["asks"].set()
    loading.join(10)
    waiter.join(10)
    assert not loading.is_alive() and not waiter.is_alive()
    assert got["model"]["of"] == "tok" and got["tok"]["name"] == "tok"
    assert sorted(actions(events, "loaded")) == ["model", "tok"]


def test_loaders_that_use_each_other_are_a_clear_error():
    cache, _ = make_cache()
    CACHES["cache"] = cache
    cache.add(ContextSpec("a", uses, args=["b"]))
    cache.add(ContextSpec("b", uses, args=["a"]))
    cache.add(ContextSpec("self", uses, args=["self"]))
    with pytest.raises(ContextCycleError, match=r"'a' asks for context 'a'.*a -> b -> a"):
        cache.get("a")
    with pytest.raises(ContextCycleError, match=r"\(self -> self\)"):
        cache.get("self")
    # nothing is left taken: the next context loads at once
    cache.add(ContextSpec("c", blob, args=["c"]))
    assert cache.get("c")["name"] == "c"
    assert cache.loading() == []


# ---------------------------------------------------------------- host tier, on CPUs
class FakeGPU:
    """A :class:`~dask_context.tiers.Mover` for machines without a GPU.

    A context is a ``blob`` dict; its ``"on"`` field says where its data is. Copies
    to the device take ``copy_seconds``; ``oom`` makes the next copies to the device
    raise CUDA's out-of-memory error.
    """

    def __init__(self, copy_seconds=0.0, to_host_seconds=0.0, free=(10 * 2**30, 80 * 2**30)):
        self.copy_seconds = copy_seconds
        self.to_host_seconds = to_host_seconds
        self.free = free
        self.oom = 0
        self.calls = []

    def place(self, obj, device):
        obj["on"] = device
        return obj

    def find(self, obj, device, others):
        return [(obj, device)] if device.startswith("cuda") else None

    def host_nbytes(self, moved):
        return sum(len(obj["data"]) for obj, _ in moved)

    def to_host(self, moved):
        time.sleep(self.to_host_seconds)
        for obj, _ in moved:
            self.calls.append(("to_host", obj["name"]))
            obj["on"] = "host"

    def to_device(self, moved):
        if self.oom:
            self.oom -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        time.sleep(self.copy_seconds)
        for obj, device in moved:
            self.calls.append(("to_device", obj["name"]))
            obj["on"] = device

    def release(self):
        self.calls.append(("release",))

    def memory(self, device):
        return self.free


def gpu_cache(contexts=1.5, host=0, mover=None, **kwargs):
    """A cache on a fake "cuda:0" with a budget of ``contexts`` blobs of 1000 bytes and
    a host budget of ``host`` of them."""
    one = sizeof(blob("x"))
    mover = mover or FakeGPU()
    cache, events = make_cache(budget=contexts * one, host_budget=host * 1000, device="cuda:0",
                               gpu_free=[80 * 2**30], mover=mover, **kwargs)
    return cache, events, mover


def last(events, action, name=None):
    return next(e for e in reversed(events) if e["action"] == action and name in (None, e["context"]))


def test_an_evicted_gpu_context_comes_back_from_host_memory():
    cache, events, _ = gpu_cache(host=2, mover=FakeGPU(copy_seconds=0.01))
    for name in "ab":
        cache.add(ContextSpec(name, blob, args=[name], kwargs={"seconds": 0.2}))
    a = cache.get("a")
    assert a["on"] == "cuda:0" and last(events, "loaded")["from"] == "storage"
    cache.get("b")  # over the budget: a goes to the host
    evicted = last(events, "evicted", "a")
    assert evicted["reason"] == "memory budget" and evicted["tier"] == "host"
    assert a["on"] == "host" and cache.host_bytes() == {"a": 1000} and "a" not in cache.resident_bytes()

    assert cache.get("a") is a and a["on"] == "cuda:0"  # the same object, not a new load
    back = last(events, "loaded", "a")
    assert back["from"] == "host" and back["device"] == "cuda:0"
    assert back["seconds"] < 0.1 and last(events, "loaded", "b")["seconds"] >= 0.2
    assert cache.loads == {"a": 1, "b": 1} and cache.rewarms == {"a": 1}
    assert set(cache.resident_bytes()) == {"a"} and set(cache.host_bytes()) == {"b"}
    assert [e.get("from") for e in events if e["action"] == "loading"] == ["storage", "storage", "host"]


def test_host_copies_past_the_host_budget_go_least_recently_used_first():
    cache, events, _ = gpu_cache(host=1.5)  # one host copy
    for name in "abc":
        cache.add(ContextSpec(name, blob, args=[name]))
    cache.get("a")
    cache.get("b")  # a -> host
    cache.get("c")  # b -> host, a's copy is dropped
    assert cache.host_bytes() == {"b": 1000}
    cache.get("a")  # from storage again; c -> host, b dropped
    assert last(events, "loaded", "a")["from"] == "storage" and cache.loads["a"] == 2
    assert cache.host_bytes() == {"c": 1000}
    assert sum(cache.host_bytes().values()) <= cache.host_budget


def test_a_context_larger_than_the_host_budget_is_dropped():
    cache, events, mover = gpu_cache(host=0.5)
    for name in "ab":
        cache.add(ContextSpec(name, blob, args=[name]))
    cache.get("a")
    cache.get("b")
    assert last(events, "evicted", "a")["tier"] is None and cache.host_bytes() == {}
    assert ("to_host", "a") not in mover.calls


def test_only_evictions_that_make_room_keep_a_host_copy():
    cache, events, _ = gpu_cache(contexts=10, host=10)
    for name in "abcd":
        cache.add(ContextSpec(name, blob, args=[name]))
        cache.get(name)
    cache.evict("a")  # asked for by name: gone
    assert cache.evict_unused(["b"]) == ["b"]  # the router makes room: kept
    assert [(e["context"], e["tier"]) for e in events if e["action"] == "evicted"] == [("a", None), ("b", "host")]
    assert cache.host_bytes() == {"b": 1000}
    cache.remove("b")  # unregistered: its host copy goes too
    assert cache.host_bytes() == {}
    cache.evict_unused(["c"])
    cache.add(ContextSpec("c", blob, args=["c2"]))  # replaced: the old copy is useless
    assert cache.host_bytes() == {} and cache.get("c")["name"] == "c2"
    cache.evict_unused(["d"])
    cache.clear()
    assert cache.host_bytes() == {} and cache.resident_bytes() == {}


def test_contexts_on_the_cpu_have_no_host_tier():
    cache, events, _ = gpu_cache(host=10)
    for name in "ab":
        cache.add(ContextSpec(name, blob, args=[name], device="cpu"))
    cache.get("a")
    cache.get("b")
    assert last(events, "evicted", "a")["tier"] is None and cache.host_bytes() == {}


def test_without_a_host_budget_nothing_is_copied():
    cache, events, mover = gpu_cache(host=0)
    for name in "ab":
        cache.add(ContextSpec(name, blob, args=[name]))
    cache.get("a")
    cache.get("b")
    assert last(events, "evicted", "a")["tier"] is None
    assert not [c for c in mover.calls if c[0] != "release"]


def test_a_get_during_the_copy_to_host_waits_for_it_instead_of_loading_again():
    cache, events, _ = gpu_cache(contexts=10, host=10, mover=FakeGPU(to_host_seconds=0.3))
    cache.add(ContextSpec("a", blob, args=["a"], kwargs={"seconds": 0.5}))
    a = cache.get("a")
    evicting = threading.Thread(target=cache.evict_unused, args=(["a"],))
    evicting.start()
    time.sleep(0.1)  # the copy to the host is under way
    assert cache.get("a") is a
    evicting.join()
    assert cache.loads == {"a": 1} and cache.rewarms == {"a": 1}
    assert cache.resident_bytes() == {"a": last(events, "loaded")["nbytes"]} and cache.host_bytes() == {}


def test_cuda_out_of_memory_is_a_context_too_large_error_naming_context_device_and_free_memory():
    cache, events, _ = gpu_cache(contexts=10)

    def huge(device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cache.add(ContextSpec("huge", huge))
    cache.add(ContextSpec("small", blob, args=["small"]))
    with pytest.raises(ContextTooLargeError, match=(
        r"context 'huge' does not fit on cuda:0: OutOfMemoryError while loading it, with "
        r"10.00 GiB free of 80.00 GiB on cuda:0")) as info:
        cache.get("huge")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    failed = last(events, "failed")
    assert failed["context"] == "huge" and isinstance(failed["exc"], ContextTooLargeError)
    # the worker goes on: other contexts load, and the failure is remembered, not retried
    assert cache.get("small")["on"] == "cuda:0"
    with pytest.raises(ContextTooLargeError):
        cache.get("huge")


def test_out_of_memory_evicts_idle_contexts_and_retries_once():
    cache, events, _ = gpu_cache(contexts=10, host=10)
    attempts = []

    def tight(device):
        attempts.append(device)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return blob("tight")

    cache.add(ContextSpec("idle", blob, args=["idle"]))
    cache.add(ContextSpec("tight", tight))
    cache.get("idle")
    assert cache.get("tight")["name"] == "tight" and len(attempts) == 2
    evicted = last(events, "evicted", "idle")
    assert evicted["reason"] == "out of memory" and evicted["tier"] == "host"


def test_out_of_memory_coming_back_from_the_host_drops_the_copy():
    cache, events, mover = gpu_cache(contexts=10, host=10, failed_load_retry=0.2)
    cache.add(ContextSpec("a", blob, args=["a"]))
    cache.get("a")
    cache.evict_unused(["a"])
    mover.oom = 1
    with pytest.raises(ContextTooLargeError, match="context 'a' does not fit on cuda:0"):
        cache.get("a")
    assert cache.host_bytes() == {} and last(events, "failed")["context"] == "a"
    time.sleep(0.25)
    assert cache.get("a")["on"] == "cuda:0" and last(events, "loaded")["from"] == "storage"


def test_a_memory_error_on_the_cpu_names_the_host_memory():
    cache, _ = make_cache(device="cpu")

    def greedy():
        raise MemoryError()

    cache.add(ContextSpec("greedy", greedy))
    with pytest.raises(ContextTooLargeError, match=r"context 'greedy' does not fit on cpu: MemoryError while loading it, with .* free of .* on cpu"):
        cache.get("greedy")


def test_torch_mover_swaps_tensor_data_in_place():
    from dask_context.tiers import TorchMover, device_tensors

    class Wrapper:  # as LanguageModel holds its model
        def __init__(self):
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.extra = {"scale": torch.ones(2)}

    w = Wrapper()
    tensors = device_tensors(w, "cpu")
    assert len(tensors) == 5  # 2 weights, 2 biases, the scale
    expected = [t.clone() for t in tensors]
    weight = w.model[0].weight
    moved = [(t, t.device) for t in tensors]
    mover = TorchMover()
    storage = weight.untyped_storage().data_ptr()
    mover.to_host(moved)  # on a CPU: new host storage, same tensor objects
    assert w.model[0].weight is weight and weight.untyped_storage().data_ptr() != storage
    mover.to_device(moved)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected, strict=True))
    assert mover.host_nbytes(moved) == sum(t.element_size() * t.nelement() for t in tensors)
    # nothing on a GPU: nothing to keep
    assert mover.find(w, "cpu", []) is None and mover.find(w, "cuda:0", []) is None


def test_a_failed_copy_to_the_host_drops_the_context_and_the_cache_goes_on():
    class FailsOnce(FakeGPU):
        failed = False

        def to_host(self, moved):
            if not self.failed:
                self.failed = True
                raise RuntimeError("cudaHostAlloc failed")
            super().to_host(moved)

    cache, events, _ = gpu_cache(contexts=10, host=1.5, mover=FailsOnce())
    cache.add(ContextSpec("a", blob, args=["a"]))
    cache.get("a")
    assert cache.evict_unused(["a"]) == ["a"]
    assert last(events, "evicted", "a")["tier"] is None and cache.host_bytes() == {}
    assert cache.get("a")["on"] == "cuda:0" and cache.loads == {"a": 2}
    # the failed copy gave its reservation back: the next one fits the host budget
    cache.evict_unused(["a"])
    assert last(events, "evicted", "a")["tier"] == "host" and cache.host_bytes() == {"a": 1000}
