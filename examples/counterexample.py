"""The GoLore counter-example: GaLore stalls, GoLore / large-batch GaLore / RSO converge.

    python examples/counterexample.py --preset paper --png docs/counterexample.png --json docs/counterexample.json

Every flag: ``python examples/counterexample.py --help``; the logic is in :mod:`train.counterexample`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.counterexample import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
