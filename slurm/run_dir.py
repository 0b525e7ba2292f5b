"""Validate a recipe + dotted overrides (and that its data directories exist) and print the run directory (used by
pretrain.sbatch before launch).

    python slurm/run_dir.py RECIPE.yaml [key.path=value ...]

A bad recipe or override prints the one-line ConfigError and exits with status 2, so the batch job fails in
seconds, before any node starts torchrun.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, wherever it is run from

from launcher.config import ConfigError, check_data_dirs, load_config  # noqa: E402
from launcher.errors import report  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: run_dir.py RECIPE.yaml [key.path=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
        check_data_dirs(cfg.data)  # the run's check: a job whose data is missing fails before it launches
    except ConfigError as e:
        return report(e)
    print(cfg.logging.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
