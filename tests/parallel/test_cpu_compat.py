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


def test_distributed_optimizer_fails_without_patches_4_and_5_and_steps_with_them():
    """Patches 4 and 5: megatron-core's DistributedOptimizer cannot be built on a CPU as shipped; patched, one
    DDP + distributed-optimizer step runs on a 1-rank gloo world."""
    proc = _run("""
        import os, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(__import__("tests.helpers.dist",
                          fromlist=["free_port"]).free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.module import MegatronModule
        ps.initialize_model_parallel()

        def build():
            cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True,
                                    params_dtype=torch.bfloat16)
            module = MegatronModule(cfg)
            module.weight = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.bfloat16))
            ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True), module,
                pg_collection=ProcessGroupCollection.use_mpu_process_groups())
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.1, bf16=True,
                                                         use_distributed_optimizer=True, clip_grad=1.0), [ddp],
                                         pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                                         use_gloo_process_groups=False)
            return module, ddp, opt

        try:
            build()
            print("built-unpatched")
        except AssertionError as e:
            print("unpatched:", "not compiled with CUDA" in str(e))
        from parallel import cpu_compat
        cpu_compat.apply()
        module, ddp, opt = build()
        (module.weight.float() ** 2).sum().backward()
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        print(ok, round(norm, 3), bool((module.weight < 1).all()))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-5:] == ["unpatched:", "True", "True", "16.0", "True"], proc.stdout


def test_megatron_still_has_the_patched_assumptions():
    # a fresh interpreter: in this one another test may already have applied the shim
    proc = _run("""
        import inspect
        from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
        from megatron.core import utils
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
        from megatron.core.pipeline_parallel import schedules
        src = inspect.getsource
        print("torch.cuda.synchronize()" in src(filesystem_async.FileSystemWriterAsync.preload_tensors),
              "Manager()" in src(filesystem_async.get_write_results_queue),
              "torch.cuda.current_device()" in src(state_dict_saver.save_state_dict_async_finalize),
              "device='cuda'" in src(optimizer.MixedPrecisionOptimizer.__init__),
              'device="cuda"' in src(utils.local_multi_tensor_l2_norm),
              "torch.cuda.current_stream()" in src(param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync),
              "'torch.cuda.BFloat16Tensor'" in src(distrib_optimizer.DistributedOptimizer),
              "'torch.cuda.FloatTensor'" in src(clip_grads.clip_grad_by_total_norm_fp32),
              'device="cuda"' in src(schedules.forward_backward_no_pipelining))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"] * 9


def test_pipeline_schedule_fails_without_patch_6_and_runs_with_it():
    """Patch 6: megatron-core's schedule (here PP = 1, one process) cannot run on a CPU as shipped; patched, it runs
    forward and backward (the gradient of sum(w x) is x)."""
    proc = _run("""
        import torch
        from parallel import cpu_compat, schedule
        from parallel.groups import ParallelGroups
        apply = cpu_compat.apply
        cpu_compat.apply = lambda: False  # the schedule below runs unpatched first
        lin = torch.nn.Linear(2, 1, bias=False)
        lin.pre_process = lin.post_process = True
        run = schedule.PipelineSchedule(ParallelGroups.single(), 1, (1, 1, 2), torch.float32)
        step = lambda: run([lin], [torch.tensor([[3.0, 5.0]])], lambda chunk, mb, x: chunk(mb).sum())
        try:
            step()
            print("ran")
        except (AssertionError, RuntimeError):
            print("failed")
        assert apply() is True
        print(float(step()[0] != 0), lin.weight.grad.tolist())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["failed", "1.0 [[3.0, 5.0]]"]


def test_inert_when_cuda_is_available(monkeypatch):
    from parallel import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    original = torch.cuda.synchronize
    from megatron.core.optimizer import optimizer

    torch_seen_by_megatron = optimizer.torch
    assert cpu_compat.apply() is False
    assert torch.cuda.synchronize is original
    assert optimizer.torch is torch_seen_by_megatron


def test_results_queue_is_a_thread_queue():
    from parallel.cpu_compat import _thread_results_queue

    assert isinstance(_thread_results_queue(), queue.Queue)
