import math

import pytest

from dask_context.errors import ContextTooLargeError
from dask_context.policy import (
    ContextView,
    Resident,
    RetireView,
    WorkerView,
    choose_victims,
    hold_back,
    load_failed_everywhere,
    plan_routes,
    resolve_device,
    workers_wanted,
)


def test_victims_are_least_recently_used_first():
    held = {n: Resident(10, t) for n, t in [("new", 3.0), ("old", 1.0), ("mid", 2.0)]}
    assert choose_victims(held, needed=15, budget=30) == ["old", "mid"]
    assert choose_victims(held, needed=15, budget=30, protected={"old"}) == ["mid", "new"]


def test_victims_when_nothing_can_go():
    held = {"a": Resident(10, 1.0)}
    assert choose_victims(held, needed=15, budget=20, protected={"a"}) == []
    with pytest.raises(ContextTooLargeError, match="does not fit"):
        choose_victims({}, needed=21, budget=20)


def test_resolve_device_prefers_free_gpu_and_rejects_missing_one():
    assert resolve_device("auto", [5, 5, 9, 9]) == "cuda:2"
    assert resolve_device("cpu", [5]) == "cpu"
    with pytest.raises(ValueError, match="sees 0 GPU"):
        resolve_device("cuda", [])


def ctx(queued, backlog, load_time=5.0, nbytes=0, allowed=(), first=()):
    return ContextView(queued, backlog, load_time, nbytes, frozenset(allowed), first)


def test_new_context_goes_to_idle_worker_not_busy_one():
    workers = {"busy": WorkerView(inflight=2), "idle": WorkerView()}
    assert plan_routes({"A": ctx(3, 1.0)}, workers).add == {"A": {"idle"}}


def test_new_context_shares_busy_worker_when_it_fits():
    workers = {"w": WorkerView(budget=100, resident={"A": Resident(40, 0)}, inflight=2)}
    contexts = {"A": ctx(10, 10.0, nbytes=40, allowed={"w"}), "B": ctx(3, 1.0, nbytes=40)}
    assert plan_routes(contexts, workers).add == {"B": {"w"}}


def test_idle_context_is_evicted_for_one_with_work():
    workers = {"w": WorkerView(budget=100, resident={"A": Resident(80, 0)})}
    contexts = {"A": ctx(0, 0.0, nbytes=80, allowed={"w"}), "B": ctx(3, 1.0, nbytes=80)}
    plan = plan_routes(contexts, workers)
    assert plan.add == {"B": {"w"}}
    assert plan.evict == {"w": ["A"]}


def test_context_larger_than_every_budget_goes_where_it_fails_loudly():
    # waiting would never end: the largest idle worker tries (its load raises if
    # the size is right) rather than a busy one, which would overflow
    workers = {"small": WorkerView(budget=100), "large": WorkerView(budget=150)}
    assert plan_routes({"A": ctx(3, 1.0, nbytes=200)}, workers).add == {"A": {"large"}}
    workers["large"] = WorkerView(budget=150, inflight=1)
    assert plan_routes({"A": ctx(3, 1.0, nbytes=200)}, workers).add == {"A": {"small"}}
    workers["small"] = WorkerView(budget=100, inflight=1)
    assert plan_routes({"A": ctx(3, 1.0, nbytes=200)}, workers).add == {}


def test_context_waits_while_workers_are_busy_but_could_hold_it():
    workers = {"w": WorkerView(budget=100, resident={"B": Resident(80, 0)}, inflight=1)}
    contexts = {"A": ctx(3, 1.0, nbytes=80), "B": ctx(3, 1.0, nbytes=80, allowed={"w"})}
    assert plan_routes(contexts, workers).add == {}


def test_widening_stops_when_backlog_per_worker_is_below_a_load():
    workers = {f"w{i}": WorkerView() for i in range(10)}
    # 40 s of work, 10 s loads: widen while 40/k > 10, i.e. up to k = 4
    plan = plan_routes({"A": ctx(400, 40.0, load_time=10.0)}, workers)
    assert len(plan.add["A"]) == 4


def test_earlier_work_gets_workers_first():
    workers = {"w": WorkerView(budget=100)}
    contexts = {
        "late": ctx(5, 5.0, nbytes=80, first=(0, 2)),
        "early": ctx(5, 5.0, nbytes=80, first=(0, 1)),
    }
    assert plan_routes(contexts, workers).add == {"early": {"w"}}


def test_dead_allowed_workers_do_not_count():
    # "gone" is allowed but not running any more: A needs a worker again
    contexts = {"A": ctx(5, 1.0, allowed={"gone"})}
    assert plan_routes(contexts, {"w": WorkerView()}).add == {"A": {"w"}}


def test_no_workers_means_no_plan():
    assert plan_routes({"A": ctx(5, 1.0)}, {}).add == {}


def test_unknown_sizes_count_as_a_whole_worker_until_measured():
    # three contexts of unknown size on two workers with a finite budget: each
    # worker takes one, the third waits (it would evict one with queued work)
    workers = {"w1": WorkerView(budget=100), "w2": WorkerView(budget=100)}
    contexts = {c: ctx(5, 5.0, nbytes=None, first=(i,)) for i, c in enumerate("ABC")}
    assert plan_routes(contexts, workers).add == {"A": {"w1"}, "B": {"w2"}}
    # once measured small, they share
    contexts = {c: ctx(5, 5.0, nbytes=30, first=(i,)) for i, c in enumerate("ABC")}
    plan = plan_routes(contexts, {"w1": WorkerView(budget=100)})
    assert plan.add == {"A": {"w1"}, "B": {"w1"}, "C": {"w1"}}
    # with no budget (unlimited), unknown is no obstacle
    contexts = {c: ctx(5, 5.0, nbytes=None, first=(i,)) for i, c in enumerate("AB")}
    assert plan_routes(contexts, {"w1": WorkerView()}).add == {"A": {"w1"}, "B": {"w1"}}


def test_contexts_with_tasks_on_a_worker_are_not_evicted_there():
    workers = {"w": WorkerView(budget=100, resident={"A": Resident(80, 0)}, busy=frozenset({"A"}))}
    contexts = {"A": ctx(0, 0.0, nbytes=80, allowed={"w"}), "B": ctx(3, 1.0, nbytes=80)}
    assert plan_routes(contexts, workers).add == {}


def test_excluded_workers_are_never_chosen():
    workers = {"bad": WorkerView(), "good": WorkerView(inflight=3)}
    view = ContextView(3, 1.0, 5.0, 10, excluded=frozenset({"bad"}))
    assert plan_routes({"A": view}, workers).add == {"A": {"good"}}
    everyone = ContextView(3, 1.0, 5.0, 10, excluded=frozenset({"bad", "good"}))
    assert plan_routes({"A": everyone}, workers).add == {}


def test_load_failures_fail_tasks_only_when_nowhere_is_left():
    assert not load_failed_everywhere({"a"}, {"a", "b", "c"}, serving=False, limit=3)
    assert load_failed_everywhere({"a", "b", "c"}, {"a", "b", "c"}, serving=False, limit=5)
    assert load_failed_everywhere({"a", "x", "y"}, {"a", "b"}, serving=False, limit=3)
    assert not load_failed_everywhere({"a", "b", "c"}, {"a", "b", "c", "d"}, serving=True, limit=3)
    assert not load_failed_everywhere(set(), {"a"}, serving=False, limit=1)
    # with no worker at all, tasks wait for one rather than fail
    assert not load_failed_everywhere({"gone"}, set(), serving=False, limit=3)


def test_scale_in_holds_back_only_warm_workers_worth_keeping_and_their_groups():
    views = {
        "cold": RetireView(),
        "warm-recent": RetireView(warm=frozenset({"A"}), idle_for=5),
        "warm-old": RetireView(warm=frozenset({"A", "B"}), idle_for=100),
        "warm-busy": RetireView(warm=frozenset({"C"}), idle_for=0.0),
    }
    assert hold_back(views, wanted=(), keep_warm=60) == {"warm-recent", "warm-busy"}
    assert hold_back(views, wanted={"B"}, keep_warm=60) == {"warm-recent", "warm-old", "warm-busy"}
    assert hold_back(views, wanted=(), keep_warm=0) == set()
    # a held-back worker keeps its batch job's other workers; other jobs are free
    jobs = {
        "j1-0": RetireView(warm=frozenset({"A"}), idle_for=1, group="j1"),
        "j1-1": RetireView(group="j1"),
        "j2-0": RetireView(group="j2"),
        "j2-1": RetireView(group="j2"),
    }
    assert hold_back(jobs, wanted=(), keep_warm=60) == {"j1-0", "j1-1"}
    assert hold_back({"x": RetireView()}, wanted={"A"}, keep_warm=math.inf) == set()


def test_workers_wanted_counts_load_and_startup():
    # 100 s of work; a new worker needs 10 s to start and 10 s to load: 5 workers
    assert workers_wanted({"A": ctx(1000, 100.0, load_time=10.0)}, 10.0, 5.0) == 5
    # never fewer than it already uses, never more than it has tasks
    assert workers_wanted({"A": ctx(2, 0.1, allowed={"a", "b", "c"})}, 10.0, 5.0) == 3
    assert workers_wanted({"A": ctx(2, 500.0)}, 0.0, 1.0) == 2
