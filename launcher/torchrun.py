"""`moetron torchrun [torchrun arguments] -m launcher.pretrain ...` (also `python -m launcher.torchrun`): torchrun
(``torch.distributed.run``, the same arguments and behaviour) that ends with one line instead of its traceback
when a signal stops it.

torchrun turns SIGTERM/SIGINT into an exception: it sends the signal on to its workers, waits for them (each saves a
checkpoint and exits cleanly, ``launcher.train.preemption.Preemption``) and then raises ``SignalException`` from its
main loop, which plain ``torchrun`` prints as a traceback even when every worker finished its save. Here that
exception becomes ``moetron: warning: torchrun stopped by SIGTERM ...`` and exit code 128 + the signal number (what
a shell and Slurm report for a process ended by that signal). Everything else is torchrun's own.
"""
from __future__ import annotations

import logging
import signal
import sys

from launcher import log as console

log = logging.getLogger("launcher.torchrun")  # by name: run as `python -m`, __name__ is "__main__"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    console.setup(quiet=False, verbose=False)
    try:
        torch_run.main(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        log.warning(f"torchrun stopped by {signal.Signals(e.sigval).name}: its workers were told to stop, and each "
                    "saved a checkpoint first if it could ('latest' names the newest complete one)")
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
