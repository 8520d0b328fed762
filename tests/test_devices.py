"""GPU discovery and budgets without torch, on machines without a GPU.

``nvidia-smi`` is faked by a script on a ``PATH`` handed to :func:`discover`;
``CUDA_VISIBLE_DEVICES`` comes in the same environment mapping.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import dask
import pytest
from distributed import Client, LocalCluster

import dask_context as dc
from dask_context import devices
from dask_context.devices import GPU, discover
from dask_context.errors import SettingError
from dask_context.models import load_causal_lm
from tests.loaders import blob, use_context

MIB = 2**20
SMI_OUTPUT = """\
0, GPU-aaaa-0000, 81559, 80000
1, GPU-bbbb-1111, 40960, 1024
2, GPU-cccc-2222, 24576, [N/A]
"""


def fake_smi(tmp_path, output=SMI_OUTPUT, status=0):
    """A fake nvidia-smi that prints ``output``, records its arguments and exits with ``status``."""
    script = tmp_path / "nvidia-smi"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {tmp_path / "calls"}
        cat <<'EOF'
        {textwrap.indent(output, "        ").strip()}
        EOF
        exit {status}
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": str(tmp_path)}


def calls(tmp_path):
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_every_gpu_when_cuda_visible_devices_is_unset(tmp_path):
    env = fake_smi(tmp_path)
    gpus = discover(env, use_nvml=False)
    assert gpus == [
        GPU(0, "GPU-aaaa-0000", 81559 * MIB, 80000 * MIB),
        GPU(1, "GPU-bbbb-1111", 40960 * MIB, 1024 * MIB),
        GPU(2, "GPU-cccc-2222", 24576 * MIB, None),
    ]
    assert calls(tmp_path) == [" ".join(devices.SMI_QUERY)]


def test_cuda_visible_devices_picks_and_orders_the_gpus(tmp_path):
    env = fake_smi(tmp_path)
    assert [g.index for g in discover({**env, "CUDA_VISIBLE_DEVICES": "1,0"}, use_nvml=False)] == [1, 0]
    by_uuid = discover({**env, "CUDA_VISIBLE_DEVICES": "GPU-cccc,GPU-aaaa-0000"}, use_nvml=False)
    assert [g.index for g in by_uuid] == [2, 0]
    # CUDA ignores everything from the first invalid entry on
    assert [g.index for g in discover({**env, "CUDA_VISIBLE_DEVICES": "2,7,0"}, use_nvml=False)] == [2]


@pytest.mark.parametrize("hidden", ["", "-1", "NoDevFiles"])
def test_hidden_gpus_are_not_even_queried(tmp_path, hidden):
    env = fake_smi(tmp_path)
    assert discover({**env, "CUDA_VISIBLE_DEVICES": hidden}, use_nvml=False) == []
    assert calls(tmp_path) == []


def test_a_failing_or_missing_nvidia_smi_means_no_gpu(tmp_path):
    env = fake_smi(tmp_path, output="NVIDIA-SMI has failed: no driver", status=9)
    assert devices._smi_gpus(env["PATH"]) is None
    assert devices._smi_gpus(str(tmp_path / "nowhere")) is None


def test_a_mig_instance_without_nvml_has_unknown_memory(tmp_path):
    env = fake_smi(tmp_path)
    gpus = discover({**env, "CUDA_VISIBLE_DEVICES": "MIG-4f2a-77"}, use_nvml=False)
    assert gpus == [GPU(-1, "MIG-4f2a-77", None, None)]
    settings = {"memory-budget": "auto", "memory-fraction": 0.8}
    assert devices.memory_budget(settings, "cuda:0", gpus, memory_limit=2**30) == float("inf")


def test_a_rotated_worker_pins_to_its_own_gpu_and_budgets_from_it(tmp_path):
    # dask-cuda's second worker of three: its own GPU first
    env = {**fake_smi(tmp_path), "CUDA_VISIBLE_DEVICES": "1,2,0"}
    gpus = discover(env, use_nvml=False)
    device = devices.choose_device("auto", gpus, own_first=True)
    assert device == "cuda:0" and gpus[0].index == 1  # though GPU 0 has more free memory
    settings = {"memory-budget": "auto", "memory-fraction": 0.5}
    assert devices.memory_budget(settings, device, gpus, memory_limit=None) == 40960 * MIB / 2
    # every GPU visible: the one with the most free memory
    all_gpus = discover(fake_smi(tmp_path), use_nvml=False)
    assert devices.choose_device("auto", all_gpus, own_first=False) == "cuda:0"
    assert devices.choose_device("cpu", all_gpus, own_first=True) == "cpu"


def test_budget_settings_are_checked():
    with pytest.raises(SettingError, match=r"dask-context\.worker\.host-memory-budget: 'lots'"):
        devices.host_budget("lots", "cuda:0", memory_limit=None)
    with pytest.raises(SettingError, match="memory-fraction"):
        devices.memory_budget({"memory-budget": "auto", "memory-fraction": 2}, "cpu", [], 10)


def test_discovery_and_dask_context_do_not_import_torch():
    code = (
        "import sys, dask_context, dask_context.worker, dask_context.cache\n"
        "from dask_context import devices\n"
        "devices.discover()\n"
        "devices.memory_info('cpu')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def torch_state() -> tuple[bool, int | None]:
    """On a worker: whether torch is imported, and its intra-op threads if so."""
    torch = sys.modules.get("torch")
    return torch is not None, torch.get_num_threads() if torch is not None else None


def test_a_worker_with_contexts_that_do_not_use_torch_never_imports_it():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        dc.register(client, dc.ContextSpec("plain", blob, args=["plain"]))
        with dc.use("plain"):
            assert client.submit(use_context, 1, "plain").result()[:2] == ("plain", 1)
        assert list(client.run(torch_state).values()) == [(False, None)]
        (info,) = dc.report(client)["workers"].values()
        assert info["budget"] > 0


def test_torch_threads_are_set_once_a_context_imports_torch(model_dir):
    # 3: neither torch's default here nor the worker's thread count
    with dask.config.set({"dask-context.worker.torch-threads": 3}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    with cluster, Client(cluster) as client:
        dc.register(client, dc.ContextSpec("lm", load_causal_lm, args=[str(model_dir)]))
        assert list(client.run(torch_state).values()) == [(False, None)]  # set up, not loaded
        with dc.use("lm"):
            client.submit(lambda: repr(dc.get_context("lm"))).result()
        assert list(client.run(torch_state).values()) == [(True, 3)]


def test_visible_devices_of_this_process_are_read_by_default():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "from dask_context import devices; print(devices.discover())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "[]"
