"""llama.cpp's CPU decoding of L1's GGUF export (f16, q8_0) beside L1's own, at batch 1.

    python -m bench.gguf [--run RUN] [--contexts 64 256 1024] [--new_tokens 32] [--repeats 3] [--threads 1]

The same weights for every contender: a trained run (--run), else random weights of
bench.generate's shape (6 x 512, vocabulary 8192, context 1024) with a tokenizer trained for them
on the shared Wikipedia sample. The run is exported with `python -m l1.export` at f16 and q8_0 and
decoded greedily by llama.cpp (llama-cpp-python, its default f16 KV cache) and by L1's sampler as a
one-shot generate_simple.py runs it on a CPU (eager; int8 weights, `--dtype auto`, and fp32). Decode
rates count tokens after the first; time to first token is reported on its own. Same threads,
contenders interleaved, medians; one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, interleaved_decodes, machine
from bench.generate import l1_decode
from l1 import checkpoint, export, sampler
from l1.config import ModelConfig
from l1.model import GPT
from l1.tokenizer import Tokenizer

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia-sample"
L1_VARIANTS = {"l1_int8_eager": "int8", "l1_fp32_eager": "fp32"}  # contender -> generate_simple.py --dtype
OUTTYPES = ("f16", "q8_0")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained run folder or checkpoint (default: random weights)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and of llama.cpp")
    parser.add_argument("--smoke", action="store_true", help="seconds: a 2 x 128 model, context 64, 8 new tokens")
    return parser.parse_args(argv)


def random_run(folder: Path, smoke: bool) -> Path:
    """A run folder with random weights of bench.generate's shape and a tokenizer of its vocabulary."""
    import pyarrow.parquet as pq

    docs = pq.read_table(SHARED_SAMPLE / "train-00000-of-00003.parquet", columns=["text"]).slice(0, 3000)
    tok = Tokenizer.train(docs.column("text").to_pylist(), 512 if smoke else 8192)
    shape = (dict(n_layer=2, n_head=2, n_embd=128, block_size=128) if smoke
             else dict(n_layer=6, n_head=8, n_embd=512, block_size=1024))
    cfg = ModelConfig(vocab_size=tok.vocab_size, **shape)
    folder.mkdir()
    torch.manual_seed(0)
    checkpoint.save_file({"model": GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg),
                          "tokenizer_fingerprint": tok.fingerprint, "step": 0, "epoch": 0, "tokens_seen": 0,
                          "best_val_loss": float("inf"), "train_config": {}}, folder / checkpoint.BEST)
    tok.save(folder / "tokenizer.json")
    return folder


def llama_cpp_decode(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds from the first new token to the last, seconds to the first token), greedy."""
    llm.reset()  # no reuse of the previous repeat's cache: every repeat prefills the prompt
    start, stamps = time.perf_counter(), []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    return stamps[-1] - stamps[0], stamps[0] - start


def main(argv=None) -> None:
    import llama_cpp

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.contexts, args.new_tokens, args.repeats = [64], 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        source = args.run or str(random_run(Path(tmp) / "run", args.smoke))
        files = {outtype: export.export_gguf(source, str(Path(tmp) / outtype / "model.gguf"), outtype=outtype)
                 for outtype in OUTTYPES}
        run = checkpoint.load_run(source)
        cfg = run.model_config
        decoders = {name: sampler.Decoder(sampler.prepare(run.model().eval(), torch.device("cpu"), dtype), False)
                    for name, dtype in L1_VARIANTS.items()}
        llms = {f"llama_cpp_{outtype}": llama_cpp.Llama(str(path), n_ctx=cfg.block_size, n_batch=cfg.block_size,
                                                        n_threads=args.threads, n_threads_batch=args.threads,
                                                        verbose=False)
                for outtype, path in files.items()}
        emit(kind="setup", **machine(), llama_cpp_python=llama_cpp.__version__,
             shape=f"{cfg.n_layer}x{cfg.n_embd} h{cfg.n_head} v{cfg.vocab_size}", params=cfg.num_params,
             gguf_mib={outtype: path.stat().st_size / 2**20 for outtype, path in files.items()})
        try:
            for context in args.contexts:
                prompt = torch.randint(0, run.tokenizer.vocab_size, (1, context - args.new_tokens))
                contenders = {name: (lambda d=d: l1_decode(d, prompt, args.new_tokens)) for name, d in decoders.items()}
                contenders.update({name: (lambda llm=llm: llama_cpp_decode(llm, prompt[0].tolist(), args.new_tokens))
                                   for name, llm in llms.items()})
                for fn in contenders.values():  # warm caches and allocations
                    fn()
                seconds, firsts = interleaved_decodes(contenders, args.repeats)
                for name, s in seconds.items():
                    emit(kind="decode", contender=name, context=context, batch=1,
                         tokens_per_s=(args.new_tokens - 1) / s, first_token_s=firsts[name])
        finally:
            for llm in llms.values():
                llm.close()


if __name__ == "__main__":
    main()
