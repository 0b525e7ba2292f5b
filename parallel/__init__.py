"""What wraps the single-device model for a parallel run: process groups from megatron-core (``groups.py``,
``comm.py``, the CPU shim ``cpu_compat.py``), the TP/EP/PP model build (``model.py``, ``sharding.py``, the
pipeline layout ``layout.py``), megatron-core's pipeline schedules (``schedule.py``), expert-parallel token dispatch (``dispatch.py``) and LLEP (``llep/``), the
optimizer and gradient reduction (``optim/``), FP8 projections (``fp8/``), regional ``torch.compile``
(``compile.py``) and the configs of all of these (``config.py``). Every collective here takes its process group
explicitly; the config, planner and FP8 module swaps are local.

Importing it quiets megatron-core's and torch's notices that no moetron user can act on, so the console keeps what
they can (a bad input's one line, the run summary, progress):
- "Transformer Engine and Apex are not installed": megatron-core at import, on every CPU and every TE-less GPU node,
  where it falls back to torch code by design (8 lines per process);
- "Apex is not installed. Falling back to Torch Norm": megatron-core's model layer specs (T5, LLaVA, heterogeneous
  GPT), which its pipeline schedules import (``parallel/schedule.py``); moetron builds none of those models;
- "MCore's async save is deprecated": megatron-core on the first save of every rank, about an API moetron does not
  call (``dist_checkpointing/strategies/torch.py:749``);
- "torch.distributed is disabled ... single process": torch.distributed.checkpoint when megatron-core reads a
  checkpoint's metadata without collectives (``state_dict_loader.py:161``, ``state_dict_saver.py:187``), printed
  by every rank of a torchrun world;
- "The argument order of load has been changed": torch.distributed.checkpoint (``utils.py:465``) about the
  positional call megatron-core makes on every checkpoint load;
- "Failed to load .../torchao/_C_*.so": torchao at import (fp8 runs), for its MXFP8/CUTLASS C++ extensions, which
  cannot load on a CPU-only torch or (the cp310 build) on Python 3.11; moetron's FP8 path uses torchao's Python and
  Triton code and ``torch._scaled_(grouped_)mm``, none of those extensions;
- "<enum 'KernelPreference'> is an Enum subclass ...": torch's pytree about a registration torchao makes at import;
- "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed": megatron-core's DistributedOptimizer
  probing its fp32 main-weight shards (views of a flat buffer) every step (``optimizer/optimizer.py:68``);
- "``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor`` is deprecated": every bucket of
  megatron-core's DDP and distributed optimizer, every step;
- "The next bucket's parameter all-gather operation has already been dispatched": megatron-core's overlapped
  parameter all-gather when a model's parameters are registered in another order than forward uses them (the
  embedding and LM head come first in moetron's module order); a performance hint for megatron's developers.
"""
import logging
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm", category=UserWarning)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message="The argument order of load has been changed")
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                        module=r"megatron\.core\..*")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        "deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="The next bucket's parameter all-gather operation has already been "
                        "dispatched", module=r"megatron\.core\..*")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
    _DropMessage("MCore's async save is deprecated"))
logging.getLogger("torchao").addFilter(_DropMessage("Failed to load "))
logging.getLogger("torch.utils._pytree").addFilter(_DropMessage("%s is an Enum subclass"))
