"""Train an L1 GPT: `python train_gpu_compatible.py` trains the l1-gpu-compatible preset on Simple
English Wikipedia into models/l1-gpu-compatible/, resuming automatically from its latest checkpoint.

Every training config field is a flag (see --help); a JSON file (--config) works too, and flags
override it. A resumed run keeps its stored configuration unless a flag overrides it.
"""

import argparse
import sys

from l1 import config
from l1.cli import entry_point


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: run options plus one flag per config field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON config file (flags override it)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move an existing run folder aside (never deleted)")
    config.add_config_flags(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv=None) -> int:
    """Resolve the config (preset, stored run, --config file, flags) and train."""
    args = parse_args(argv)
    from l1 import trainer  # imported late so --help is instant

    file_values = config.load_json(args.config) if args.config else None
    cfg = trainer.configure(config.overrides_from_args(args), file_values, fresh=args.fresh)
    trainer.train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
