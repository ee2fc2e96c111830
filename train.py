#!/usr/bin/env python
"""Train a jamba_jax language model.

    python train.py [--config FILE] [--workdir DIR] [KEY=VALUE ...]

With no arguments: the tiny hybrid model (configs/models/tiny-hybrid.yaml) on the Python standard
library's source, as bytes, in runs/default (a few minutes on a laptop CPU). Every key, its default
and its meaning are in configs/base.yaml; `--config` files (configs/train/*.yaml) override it and
KEY=VALUE arguments override both (`steps=100 mesh.fsdp=4 model.d_model=256`). Giving the same
--workdir again resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Keys and defaults: configs/base.yaml.")
    parser.add_argument("--config", help="a YAML file of keys overriding configs/base.yaml")
    parser.add_argument("--workdir", default="runs/default",
                        help="checkpoints, metrics.jsonl, tensorboard/ and config.yaml go here (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted key = YAML value")
    args = parser.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src.distributed", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from jamba_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from jamba_jax.train.loop import run

        return run(cfg, args.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
