"""parallel/cpu_compat.py: each patch's original failure is real, the patch fixes it, and it is inert on CUDA.

If a megatron-core upgrade removes a CUDA assumption, `test_megatron_still_has_the_patched_assumptions` fails
for it: drop that patch."""
import queue
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for CUDA-less machines")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_originals_fail_without_cuda_and_work_patched():
    proc = _run("""
        import torch
        failures = []
        for call in (torch.cuda.synchronize, torch.cuda.current_device):
            try:
                call()
            except (AssertionError, RuntimeError):
                failures.append(call.__name__)
        from parallel import cpu_compat
        assert cpu_compat.apply() is True
        torch.cuda.synchronize()
        t = torch.tensor([1], device=torch.cuda.current_device())
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        q = filesystem_async.get_write_results_queue()
        assert q is filesystem_async.get_write_results_queue()
        print(",".join(failures), t.device, type(q).__module__)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["synchronize,current_device", "cpu", "queue"]


def test_megatron_still_has_the_patched_assumptions():
    # a fresh interpreter: in this one another test may already have applied the shim
    proc = _run("""
        import inspect
        from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
        src = inspect.getsource
        print("torch.cuda.synchronize()" in src(filesystem_async.FileSystemWriterAsync.preload_tensors),
              "Manager()" in src(filesystem_async.get_write_results_queue),
              "torch.cuda.current_device()" in src(state_dict_saver.save_state_dict_async_finalize))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]


def test_inert_when_cuda_is_available(monkeypatch):
    from parallel import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    original = torch.cuda.synchronize
    assert cpu_compat.apply() is False
    assert torch.cuda.synchronize is original


def test_results_queue_is_a_thread_queue():
    from parallel.cpu_compat import _thread_results_queue

    assert isinstance(_thread_results_queue(), queue.Queue)
