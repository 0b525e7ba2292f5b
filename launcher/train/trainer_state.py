"""The trainer's checkpointed state: what a checkpoint holds beyond the weights (RNG, data position, counters),
saving it (inline, or writing in the background with ``checkpoint.async_save``) and resuming from it.
:class:`CheckpointedState` is a base of :class:`launcher.train.trainer.Trainer` and uses its attributes
(``cfg``, ``groups``, ``model``, ``optimizer``, ``loader``, ``ckpt_root``, ``step``, ``skipped``,
``nonfinite_streak``, ``run_id``, ``last_good``, ``_saving``, ``_preemption``, ``save_stalls``, ``_mark``)."""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from launcher.config import to_dict
from launcher.train import checkpoint
from launcher.train.checkpoint_config import model_changes
from launcher.train.checkpoint_manifest import run_of

log = logging.getLogger("launcher.train.trainer")


class CheckpointedState:
    def _per_rank_state(self) -> dict:
        return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state()},
                "dp.data": self.loader.state_dict()}

    def _restore_per_rank(self, state: dict) -> None:
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            np.random.set_state(state["rng"]["numpy"])
        if "dp.data" in state:
            self.loader.load_state_dict(state["dp.data"])

    def save(self) -> Path:
        """Save the current state and wait until it is committed (collective); returns the checkpoint."""
        with self._hold():
            self.start_save(background=False)
            return self.finish_save()

    def start_save(self, background: bool) -> None:
        """Start saving the current state (collective; a save still in flight is finished first). ``background``:
        this rank's files are written by a thread (``checkpoint.async_save``) and :meth:`finish_save` commits them."""
        self.finish_save()
        self._mark("checkpoint save", slow=True)
        with self._hold():
            self._start_save(background)

    def _start_save(self, background: bool) -> None:
        start = time.perf_counter()
        common = {"step": self.step, "skipped_steps": self.skipped, "config": to_dict(self.cfg),
                  "nonfinite_streak": self.nonfinite_streak, "last_good": self.last_good}
        saving = checkpoint.start_save(
            self.ckpt_root, self.step, self.model, self.optimizer, self.groups, common, self._per_rank_state(),
            keep_last=self.cfg.checkpoint.keep_last, run=self.run_id,
            protect=(self.last_good,) if self.last_good else (), background=background)
        self._saving = (saving, self.nonfinite_streak == 0, time.perf_counter() - start)

    def finish_save(self) -> Optional[Path]:
        """Wait for the save in flight, if any, and commit it (collective); returns its checkpoint."""
        if self._saving is None:
            return None
        (saving, good, stall), self._saving = self._saving, None
        self._mark("checkpoint save", slow=True)
        start = time.perf_counter()
        with self._hold():
            path = saving.finish()
        if good:
            self.last_good = path.name
        self.save_stalls.append(stall + time.perf_counter() - start)
        log.debug(f"saved {path}; training stalled {self.save_stalls[-1]:.3f} s for it")
        return path

    def _hold(self):
        """A second Ctrl-C waits for the end of the save in this block (:meth:`Preemption.holding`)."""
        return self._preemption.holding() if self._preemption else contextlib.nullcontext()

    def maybe_resume(self, ckpt: Optional[Path]) -> Optional[Path]:
        """Resume from ``ckpt`` (``checkpoint_rank0.prepare``'s answer; None starts from scratch) after checking that
        its model/MoE config is this run's: a different shape would load wrongly or not at all."""
        if ckpt is None:
            return None
        saved = checkpoint.load_common(ckpt).get("config", {})
        diffs = model_changes(saved, to_dict(self.cfg), self.groups.world_size)
        if diffs:
            raise checkpoint.CheckpointError(
                f"cannot resume from '{ckpt}': the model differs from the checkpoint's ({', '.join(diffs)}); restore "
                "these values, or start a new run (another logging.run_dir or checkpoint.resume=never)")
        common, per_rank = checkpoint.load(ckpt, self.model, self.optimizer, self.groups, self._per_rank_state())
        self.step, self.skipped = int(common["step"]), int(common.get("skipped_steps", 0))
        self.nonfinite_streak = int(common.get("nonfinite_streak", 0))
        self.last_good = ckpt.name if self.nonfinite_streak == 0 else common.get("last_good")
        self.run_id = run_of(ckpt) or self.run_id  # a checkpoint without a run id: never prune what it did not write
        self._restore_per_rank(per_rank)
        if "rng" not in per_rank:
            log.info(f"resumed {ckpt} at a different parallel layout: random streams are re-seeded; the data "
                     "continues from the checkpoint's position (exactly when the data-parallel size is unchanged)")
        self._note_micro_batch_change(saved)
        log.info(f"resumed from {ckpt} at step {self.step}")
        return ckpt

    def _note_micro_batch_change(self, saved: dict) -> None:
        """Say that a synthetic-data run resumed with another ``train.micro_batch_size`` draws other samples from
        here on (its batch ``b`` is a function of the micro-batch size); the shard loaders say so themselves
        (``launcher/data/loader.py``). Megatron-LM also lets a resumed run change the micro-batch size."""
        before = saved.get("train", {}).get("micro_batch_size")
        now = self.cfg.train.micro_batch_size
        if self.cfg.data.source == "synthetic" and before not in (None, now):
            log.warning(f"train.micro_batch_size changed since the checkpoint ({before} -> {now}): the data position "
                        "is approximate (the synthetic batches drawn from here on differ from the uninterrupted "
                        "run's); set it back to continue exactly")
