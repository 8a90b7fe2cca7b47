import platform
import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: the heap of the test process already holds what earlier tests left behind.
PROBE = textwrap.dedent("""
    import resource
    import torch
    from reconad.train.memory import retain_freed_memory

    def faults_of_a_fresh_tensor(num_bytes):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensor = torch.empty(num_bytes // 4).fill_(1.0)  # every page touched
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del tensor
        return faults

    retained = {retain}
    if retained:
        assert retain_freed_memory()
    num_bytes = 64 << 20  # above glibc's largest mmap threshold: mmap'd afresh by default
    faults_of_a_fresh_tensor(2 * num_bytes)  # grows the heap once, with room for the alignment slack
    print(faults_of_a_fresh_tensor(num_bytes) / (num_bytes / resource.getpagesize()))
""")


def _fault_fraction(retain: bool) -> float:
    result = subprocess.run([sys.executable, "-c", PROBE.format(retain=retain)], capture_output=True, text=True,
                            timeout=120, check=True)
    return float(result.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    assert _fault_fraction(retain=False) > 0.9  # by default: one fault per page of every large tensor
    assert _fault_fraction(retain=True) < 0.05
