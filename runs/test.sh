#!/usr/bin/env bash
# Install the project with its test dependencies, then run the whole test suite on CPU.
#   bash runs/test.sh            (extra pytest arguments are passed through)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=runs/setup_env.sh
EXTRAS="[dev]" source runs/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"${PYTHON:-python}" -m pytest -q "$@"
