"""Sample from a trained L1 model: `python generate_simple.py --prompt "The future of AI is"`.

Without --model_path it uses the best checkpoint of the most recently trained run under models/.
Without --prompt it reads prompts from standard input, one per line, and generates them as a batch.
"""

import argparse
import sys

from l1 import config
from l1.cli import entry_point
from l1.errors import L1Error


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: prompt, model and device, plus one flag per sampling config field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--prompt", help="text to continue (default: read prompts from stdin, one per line)")
    parser.add_argument("--model_path", help="a run folder or a checkpoint file (default: the newest run)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a sample before this text (may be given several times)")
    config.add_sampling_flags(parser)
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, else the non-blank lines of standard input."""
    if args.prompt is not None:
        return [args.prompt]
    if sys.stdin.isatty():
        print("reading prompts from standard input, one per line (end with Ctrl-D)", file=sys.stderr)
    prompts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise L1Error("no prompt: pass --prompt TEXT or give prompts on standard input, one per line")
    return prompts


@entry_point
def main(argv=None) -> int:
    """Load the model once, then continue each prompt (streamed when there is one text)."""
    args = parse_args(argv)
    cfg = config.sampling_config_from_args(args)
    prompts = read_prompts(args)
    from l1 import sampler  # imported late: --help and bad values answer without loading torch

    lm = sampler.load(args.model_path, args.device)
    print(f"[{lm.path} | step {lm.step} | {lm.device}]", file=sys.stderr)
    if len(prompts) * cfg.num_samples == 1:  # one text: stream it as it comes
        sampler.generate(lm, prompts, cfg, tuple(args.stop), echo=True,
                         on_piece=lambda _, piece: print(piece, end="", flush=True))
        print()
    else:  # texts separated by a blank line, prompts first
        texts = sampler.generate(lm, prompts, cfg, tuple(args.stop))
        print("\n\n".join(prompts[i // cfg.num_samples] + text for i, text in enumerate(texts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
