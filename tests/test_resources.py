from __future__ import annotations

import subprocess
import sys
import time

import torch

from kvswap_vllm.resources import ResourceMeter, helper_thread_pool

CHILD = """
import os, time
buf = bytearray(300 * 2**20)
for i in range(0, len(buf), 4096): buf[i] = 1
with open(sys.argv[1], 'wb') as f:
    f.write(os.urandom(16 * 2**20)); f.flush(); os.fsync(f.fileno())
time.sleep(1.0)
"""


def test_meter_counts_children_rss_and_disk_writes(tmp_path) -> None:
    with ResourceMeter(interval_s=0.05) as meter:
        subprocess.run([sys.executable, "-c", "import sys\n" + CHILD, str(tmp_path / "f")], check=True)
    usage = meter.usage
    assert usage is not None
    assert usage.peak_rss_bytes > 300 * 2**20
    assert usage.disk_write_bytes >= 16 * 2**20
    assert usage.num_processes >= 2


def test_meter_idle_process_counts_little(tmp_path) -> None:
    # A child that wrote 16 MiB *before* the meter started must not be counted.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\n" + CHILD.replace("time.sleep(1.0)", "time.sleep(3.0)"),
                              str(tmp_path / "f")])
    try:
        deadline = time.time() + 30
        while not (tmp_path / "f").exists() or (tmp_path / "f").stat().st_size < 16 * 2**20:
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        with ResourceMeter(interval_s=0.05) as meter:
            time.sleep(0.2)
    finally:
        child.wait()
    assert meter.usage is not None and meter.usage.disk_write_bytes < 2**20


def test_helper_threads_run_torch_on_one_core_and_leave_the_callers_count() -> None:
    before = torch.get_num_threads()
    with helper_thread_pool(2, "test-helper") as pool:
        counts = list(pool.map(lambda _: torch.get_num_threads(), range(4)))
    assert counts == [1, 1, 1, 1]
    assert torch.get_num_threads() == before


def test_helper_threads_in_a_pinned_process_with_set_num_threads_replaced(monkeypatch) -> None:
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op and pins its process to its
    OpenMP cores: helper threads still run torch on one thread, and on every CPU (the pin is
    inherited, and would put them on the forward pass's core)."""
    import os
    import threading

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    result: dict = {}

    def pinned_caller() -> None:  # affinity is per thread: pin a thread, not the test process
        os.sched_setaffinity(0, {0})
        with helper_thread_pool(1, "test-pinned") as pool:
            result["helper"] = pool.submit(lambda: (torch.get_num_threads(), os.sched_getaffinity(0))).result()
        result["caller"] = os.sched_getaffinity(0)

    t = threading.Thread(target=pinned_caller)
    t.start()
    t.join()
    threads, cpus = result["helper"]
    assert threads == 1 and result["caller"] == {0}
    assert len(cpus) > 1 or os.cpu_count() == 1  # the test machine allows more than CPU 0


def test_meter_catches_a_peak_between_samples_and_counts_from_its_reset() -> None:
    def spike(mb: int) -> None:
        t = torch.ones(mb * 2**18)  # touched: resident
        del t

    with ResourceMeter(interval_s=30.0) as meter:  # no sample will land on the spikes
        spike(300)  # before the reset: not counted
        meter.reset_peak()
        base = meter._peak_rss
        spike(100)
    assert meter.usage is not None
    assert base + 90 * 2**20 < meter.usage.peak_rss_bytes < base + 200 * 2**20
