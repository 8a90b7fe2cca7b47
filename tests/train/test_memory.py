import platform
import resource

import pytest
import torch

from reconad.train.memory import retain_freed_memory


def _page_faults_of_a_fresh_tensor(num_bytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(num_bytes // 4).fill_(1.0)  # every page touched
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del tensor
    return faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    assert retain_freed_memory()
    num_bytes = 64 << 20  # above glibc's largest mmap threshold: mmap'd afresh by default
    _page_faults_of_a_fresh_tensor(2 * num_bytes)  # grows the heap once, with room for the alignment slack
    faults = _page_faults_of_a_fresh_tensor(num_bytes)
    assert faults < 0.05 * num_bytes / resource.getpagesize(), faults  # by default: one per page
