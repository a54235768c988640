"""The GoLore counter-example: GaLore stalls, GoLore / large-batch GaLore / RSO converge.

    python examples/counterexample.py --png docs/counterexample.png --json counterexample.json

Every flag: ``python examples/counterexample.py --help``; the logic is in
:mod:`rso.optim.counterexample`.
"""
from rso.optim.counterexample import main

if __name__ == "__main__":
    raise SystemExit(main())
