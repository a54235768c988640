"""The GoLore counter-example: GaLore stalls, GoLore / large-batch GaLore / RSO converge.

    python examples/counterexample.py --preset paper --png docs/results/counterexample/counterexample.png --json docs/results/counterexample/counterexample.json

Every flag: ``python examples/counterexample.py --help``; the logic is in :mod:`rso.train.counterexample`.
"""

from rso.train.counterexample import main

if __name__ == "__main__":
    raise SystemExit(main())
