#!/usr/bin/env bash
# The commands whose results are in this folder (docs/results/counterexample), each exactly as the JSON it wrote
# records it. Long: read the notes for how long each took. After a run, copy its table.json / results.json
# here under the name shown and rerun: python -m rso.train.report docs/results/counterexample
set -euo pipefail
cd "$(dirname "$0")/../../.."

# -> counterexample.png (about 13 minutes on 2 cores) and its curves as JSON:
python examples/counterexample.py --preset paper --png docs/results/counterexample/counterexample.png --json docs/results/counterexample/counterexample.json
# the fast variant the tests run (about 22 s):
# python examples/counterexample.py --png /tmp/counterexample_fast.png --json /tmp/counterexample_fast.json
