"""``torchrun --nproc-per-node N -m train --config cfg.toml [--set section.key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", help="TOML file (sections: model, nsa, data, optim, train, checkpoint, log)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting (TOML value syntax); repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
    except (ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from .trainer import train

    train(config)
    return 0


def exit_without_teardown(code: int) -> None:
    """Flush, then leave without interpreter teardown.

    Seen in CI on the CPU machines (torch 2.13, gloo, 2 ranks): after a run had finished, written
    its last record and destroyed its process group, a worker intermittently aborted during
    interpreter teardown ("terminate called without an active exception": a C++ thread still
    joinable during static destruction), so torchrun reported a failed run. Nothing is left to
    do or write at this point, so the command line skips that teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
