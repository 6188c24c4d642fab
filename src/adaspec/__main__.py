"""Command line: ``python -m adaspec demo [--pair smollm2-135m] [...]``."""

import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "demo":
        print(
            "usage: python -m adaspec demo [--pair {gemma-3-270m,smollm2-135m}] [--help]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from adaspec.demo import main as demo

    demo(sys.argv[2:])


if __name__ == "__main__":
    main()
