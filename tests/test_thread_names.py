"""asyncckpt's threads carry their names in the OS too (``top -H``, ``/proc/<pid>/task/<tid>/comm``), shortened
to the kernel's 15 bytes, so that the writer's threads and their CPU time can be told apart from training's
(benchmarks/service_budget.py measures the node's thread budget that way)."""
from __future__ import annotations

import os
import threading

import pytest

from asyncckpt.threads import EventLoopThread, os_thread_name, start_thread, started_pool
from benchmarks.service_budget import threads_of

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name, expected", [
    ("asyncckpt-service-encode_0", "acs-encode_0"), ("asyncckpt-service-file_11", "acs-file_11"),
    ("asyncckpt-encode_3", "ac-encode_3"), ("asyncckpt-io", "ac-io"), ("asyncckpt-service-link", "acs-link"),
    ("asyncckpt-lightning-remove_0", "ac-lightning-re"), ("bench-sampler", "bench-sampler"),
    ("a-very-long-name-of-a-thread", "a-very-long-nam"), ("asyncckpt-é-encode", "ac-é-encode"), ("", ""),
    ("ééééééééé", "ééééééé"),  # 2-byte characters: never half of one
])
def test_os_names_are_short_forms_within_the_kernel_limit(name, expected):
    got = os_thread_name(name)
    assert got == expected and len(got.encode()) <= 15


def _os_names() -> dict[int, str]:
    """This process's threads: tid -> OS name (what the benchmark tells their roles apart by)."""
    return {tid: name for tid, (name, _, _) in threads_of(os.getpid()).items()}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_pools_loops_and_threads_are_named_in_the_os():
    pool = started_pool(2, "asyncckpt-service-encode")
    loop = EventLoopThread("asyncckpt-test")
    ready, release = threading.Event(), threading.Event()

    def body():
        ready.set()
        release.wait(30)

    thread = start_thread(body, "asyncckpt-service-link")
    try:
        assert ready.wait(30)
        ids = {pool.submit(threading.get_native_id).result(30) for _ in range(20)}
        names = _os_names()
        assert {names[i] for i in ids} <= {"acs-encode_0", "acs-encode_1"}
        assert sorted(n for n in names.values() if n.startswith("acs-encode")) == ["acs-encode_0", "acs-encode_1"]
        assert names[thread.native_id] == "acs-link"
        assert "ac-test-io" in names.values() and sorted(n for n in names.values() if n.startswith("ac-test-wait")) \
            == ["ac-test-wait_0", "ac-test-wait_1"]
        assert names[threading.get_native_id()] not in {"acs-link", "acs-encode_0"}  # the caller keeps its own
    finally:
        release.set()
        thread.join(30)
        pool.shutdown()
        loop.close()
