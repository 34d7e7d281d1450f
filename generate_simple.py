"""Sample from a trained L1 model: `python generate_simple.py --prompt "The future of AI is"`.

Without --model_path it uses the best checkpoint of the most recently trained run under models/.
Without --prompt it reads prompts from standard input, one per line, and generates them as a batch.
With --interactive it loads the model once and continues each prompt typed, streamed: Ctrl-C
stops the current continuation, Ctrl-D (or Ctrl-C at the prompt, exit code 130) leaves.
With --chat (a model fine-tuned on chat data) each line typed or piped in is a user turn of one
conversation, and the reply is streamed; with --prompt, one turn is answered.
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
    parser.add_argument("--interactive", action="store_true",
                        help="a prompt loop: type a prompt, get its continuation; Ctrl-C stops one, Ctrl-D leaves")
    parser.add_argument("--model_path", help="a run folder or a checkpoint file (default: the newest run)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="inference weights: auto, int8 (per-channel, weight-only), bf16 or fp32; auto: int8 on "
                             "CPUs with native bf16, bf16 on GPUs, else fp32 (default: auto)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the decoding step (tens of seconds once; CUDA graphs on GPUs); "
                             "default: on CUDA only")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a sample before this text (may be given several times)")
    parser.add_argument("--chat", action="store_true",
                        help="talk with a chat model: each line is a user turn of one conversation (history kept), "
                             "the reply streamed; with --prompt, answer that one turn")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: the system message that opens the conversation")
    config.add_sampling_flags(parser)
    args = parser.parse_args(argv)
    if args.interactive and args.prompt is not None:
        parser.error("--interactive reads its prompts as you type them: leave out --prompt")
    if args.chat and args.interactive:
        parser.error("--chat is a conversation loop already: leave out --interactive")
    if args.system is not None and not args.chat:
        parser.error("--system opens a conversation: give --chat too")
    if args.chat and args.stop:
        parser.error("--chat ends each reply at the end of the model's turn: leave out --stop")
    return args


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


def interact(lm, cfg, stop: tuple[str, ...]) -> None:
    """Continue each line typed until end of input; Ctrl-C stops the continuation under way."""
    from l1 import sampler

    if sys.stdin.isatty():
        print("type a prompt and press Enter; Ctrl-C stops a continuation, Ctrl-D leaves", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()  # a Ctrl-C here leaves (KeyboardInterrupt: exit 130)
        if not line:
            return
        if not line.strip():
            continue
        try:
            sampler.generate(lm, [line.rstrip("\r\n")], cfg, stop,
                             on_piece=lambda _, piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr, flush=True)
        except L1Error as exc:  # a prompt too long for the context: say so, ask for the next
            print(f"error: {exc}", file=sys.stderr, flush=True)
        print(flush=True)


def converse(lm, cfg, args: argparse.Namespace) -> None:
    """--chat: answer --prompt, or each line of standard input as the next user turn."""
    from l1 import sampler

    def say(line: str) -> None:
        print(f"[{line}]", file=sys.stderr, flush=True)

    conversation = sampler.Conversation(lm, cfg, args.system, log=say)

    def answer(text: str) -> None:
        conversation.reply(text, on_piece=lambda piece: print(piece, end="", flush=True))
        print(flush=True)

    if args.prompt is not None:
        answer(args.prompt)
        return
    terminal = sys.stdin.isatty()
    if terminal:
        print("chat: type a message and press Enter; Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    while True:
        if terminal:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        try:
            answer(line.rstrip("\r\n"))
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr, flush=True)
        except L1Error as exc:  # a message too long for the context: say so, ask for the next
            if not terminal:
                raise
            print(f"error: {exc}", file=sys.stderr, flush=True)


@entry_point
def main(argv=None) -> int:
    """Load the model once, then continue each prompt (streamed when there is one text)."""
    args = parse_args(argv)
    cfg = config.sampling_config_from_args(args)
    if args.interactive and cfg.num_samples > 1:
        raise L1Error("--interactive streams one continuation at a time: leave out --num_samples")
    prompts = [] if args.interactive or args.chat else read_prompts(args)
    from l1 import runtime, sampler  # imported late: --help and bad values answer without loading torch

    lm = sampler.load(args.model_path, args.device, dtype=args.dtype)
    print(f"[{lm.path} | step {lm.step} | {lm.device} | {lm.dtype}]", file=sys.stderr)
    # The compiled step pays on CUDA (graphs); on a CPU it measured slower than eager over long caches
    # (0.57x at context 1024, BENCHMARKS.md), so CPU decoding compiles only when --compile asks.
    if runtime.use_compile(lm.device, args.compile, 0.0):
        sampler.compile_decoder(lm, log=lambda line: print(f"[{line}]", file=sys.stderr, flush=True))
    if args.chat:
        converse(lm, cfg, args)
    elif args.interactive:
        interact(lm, cfg, tuple(args.stop))
    elif len(prompts) * cfg.num_samples == 1:  # one text: stream it as it comes
        sampler.generate(lm, prompts, cfg, tuple(args.stop), echo=True,
                         on_piece=lambda _, piece: print(piece, end="", flush=True))
        print()
    else:  # texts separated by a blank line, prompts first
        texts = sampler.generate(lm, prompts, cfg, tuple(args.stop))
        print("\n\n".join(prompts[i // cfg.num_samples] + text for i, text in enumerate(texts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
