"""Fast decoding: the static cache step (eager and compiled) against the dynamic cache and full
recomputation, int8 and bf16 weights against fp32, the dtype rule, the compile fallback."""

import copy
import dataclasses
import hashlib
import re

import pytest
import torch
from torch._dynamo.utils import counters

from l1 import runtime, sampler
from l1.config import ModelConfig, SamplingConfig
from l1.errors import L1Error
from l1.model import GPT, KVCache

SMALL = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=64, block_size=128)
CPU = torch.device("cpu")
# An untied head, ReLU^2 and a soft cap below the raw logits' range (so that it bites).
KNOBS = dataclasses.replace(SMALL, tie_embeddings=False, mlp="relu2", logit_softcap=0.05)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(sharp: bool = False, cfg: ModelConfig = SMALL) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    if sharp:  # greedy choices well separated, so that fp32 rounding order cannot flip one
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
    return model


def greedy(decoder, prompts, n):
    cfg = SamplingConfig(temperature=0, max_tokens=n)
    return sampler.generate_ids(decoder, prompts, cfg, vocab_size=SMALL.vocab_size, eot_id=None)


@pytest.fixture(scope="module")
def compiled(one_thread):
    """One compiled fp32 decoder for the module: a CPU compilation costs tens of seconds."""
    return sampler.Decoder(sampler.prepare(random_model(sharp=True), CPU, "fp32"), compiled=True)


def test_compiled_greedy_equals_eager_token_for_token(compiled):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SMALL.vocab_size, (n,), generator=g).tolist() for n in (5, 17)]  # left-padded
    graphs = counters["stats"]["unique_graphs"]
    # 30 new tokens: a 64-slot cache; 200: the whole 128-slot context, which slides twice.
    for n in (30, 200):
        assert greedy(compiled, prompts, n) == greedy(compiled.model, prompts, n)
    assert compiled.steps and all(step.compiled is not None for step in compiled.steps.values())  # not eager
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # one graph for both cache lengths


def test_compiled_sampling_in_the_step_equals_eager_sampling(compiled):
    """The compiled step samples inside its graph (repetition penalty, top-k, top-p, the
    exponential race on noise drawn from the seeded generator) exactly as the eager step does."""
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, max_tokens=30, seed=3)
    ours = sampler.generate_ids(compiled, prompts, cfg, vocab_size=SMALL.vocab_size, eot_id=None)
    assert ours == sampler.generate_ids(compiled.model, prompts, cfg, vocab_size=SMALL.vocab_size, eot_id=None)
    assert len({tuple(row) for row in ours}) == 2 and all(len(row) == 30 for row in ours)


def test_decoding_states_persist_per_batch_size():
    """A Decoder keeps each batch size's cache (and mask, positions, slot) from call to call, at
    the same addresses, which is what lets a CUDA graph replay instead of recording again."""
    decoder = sampler.Decoder(sampler.prepare(random_model(sharp=True), CPU, "fp32"))
    prompts = [[1, 2, 3], [4, 5]]
    first = greedy(decoder, prompts, 20)
    addresses = {key: [t.data_ptr() for t in state.cache.k] for key, state in decoder.states.items()}
    assert greedy(decoder, prompts, 20) == first == greedy(decoder.model, prompts, 20)
    assert {key: [t.data_ptr() for t in state.cache.k] for key, state in decoder.states.items()} == addresses
    greedy(decoder, [[1, 2, 3]], 20)
    assert len(decoder.states) == 2  # one more batch size, one more state


@pytest.mark.parametrize("every", [1, 3, 8])
def test_reading_tokens_back_every_n_steps_changes_nothing(monkeypatch, every):
    """On a GPU tokens reach the host every few steps; ends at end-of-text, at a stop of
    on_token and at max_tokens, and the context slide, come out exactly as when read every step."""
    model = sampler.prepare(random_model(), CPU, "fp32")
    prompts = [[7] * 100, [8, 9, 10]]  # the first row fills the 128-token context: it slides
    cfg = SamplingConfig(temperature=1.0, top_k=0, max_tokens=60, seed=5)
    stops = []

    def on_token(row, token):
        stops.append((row, token))
        return row == 1 and len([r for r, _ in stops if r == 1]) == 25

    def run():
        stops.clear()
        return sampler.generate_ids(model, prompts, cfg, vocab_size=SMALL.vocab_size, eot_id=17, on_token=on_token), \
            list(stops)

    reference = run()
    monkeypatch.setitem(sampler.HOST_SYNC_EVERY, "cpu", every)
    assert run() == reference
    assert len(reference[0][1]) <= 25 and any(len(row) < 60 for row in reference[0])


def test_compiled_step_writes_the_cache_in_place():
    # Compiled out of place, a cache write copies every layer's whole cache back into it each
    # step (a copy_ kernel), a cost that grows with the cache: 0.57x of eager over 1024 slots.
    from torch._inductor.utils import run_and_get_code

    decoder = sampler.Decoder(sampler.prepare(random_model(), CPU, "fp32"), compiled=True)
    window = sampler._ContextWindow(decoder, [[1, 2, 3]], 100)
    with torch.inference_mode():
        window.prefill(SMALL.block_size)
        _, code = run_and_get_code(window.step, torch.tensor([5]), SamplingConfig(temperature=0), SMALL.vocab_size,
                                   None)
    assert all(step.compiled is not None for step in decoder.steps.values()) and code
    # The step's small in-place updates (slot, positions) fuse into the cache-writing kernel; no
    # kernel or call copies a whole buffer back.
    kernels = [name for c in code for name in re.findall(r"\b(\w*fused\w*) = async_compile", c)]
    assert kernels and all("index_put" in name for name in kernels if "copy_" in name)
    assert not any(re.search(r"aten\.copy_|\.copy_\(", c) for c in code)


@pytest.mark.parametrize("cfg", [SMALL, KNOBS], ids=["default", "knobs"])
def test_static_step_equals_full_forward(cfg):
    model = random_model(cfg=cfg)
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    cache = KVCache(SMALL, batch_size=2, max_len=32)
    key_mask = torch.zeros(2, 32, dtype=torch.bool)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :11], cache=cache, last=True)]  # prefill: its last position only
        key_mask[:, :11] = True
        cache.slot = torch.tensor([11])
        for t in range(11, 20):
            key_mask[:, t] = True
            pieces.append(model(idx[:, t:t + 1], cache=cache, positions=torch.full((2, 1), t), key_mask=key_mask))
            cache.slot += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full[:, 10:], rtol=1e-5, atol=1e-5)
    assert cache.length == 11  # a static step leaves the caller's count alone


@pytest.mark.parametrize("packed", [True, False])
def test_int8_linear_is_the_per_channel_quantized_matmul(packed):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(3, 5, 64)
    layer = sampler.Int8Linear(weight, torch.float32)
    layer.packed = packed and layer.packed  # False: the dequantizing path of devices without the kernel
    dequantized = layer.weight.float() * layer.scale[:, None]
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (96,)
    assert ((weight - dequantized).abs() <= layer.scale[:, None] / 2 + 1e-6).all()  # round to nearest
    assert layer.weight.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range
    torch.testing.assert_close(layer(x), x @ dequantized.t(), rtol=1e-4, atol=1e-4)


def test_int8_dequantizing_form_of_cuda_equals_the_packed_kernel_of_cpu():
    """CUDA's int8 path (dequantize, then the float matmul, which torch.compile fuses: gpt-fast's
    form) computes what the CPU's packed kernel computes, run here on the CPU on the same weights;
    the packed kernel serves CPUs only (CUDA's is a naive loop)."""
    model = random_model()
    idx = torch.randint(0, SMALL.vocab_size, (2, 40))
    packed = sampler.prepare(copy.deepcopy(model), CPU, "int8")
    layers = [m for m in packed.modules() if isinstance(m, sampler.Int8Linear)]
    assert layers and all(layer.packed for layer in layers)
    with torch.no_grad():
        expected = packed(idx).float()
        for layer in layers:
            layer.packed = False
        dequantized = packed(idx).float()
    # The same products; in bf16 activations the two round the scaled sum at different points.
    bf16 = packed.norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dequantized, expected, rtol=3e-2 if bf16 else 1e-5, atol=3e-2 if bf16 else 1e-5)
    assert not sampler.Int8Linear(torch.randn(8, 4, device="meta"), torch.bfloat16).packed  # not on a CPU


@pytest.mark.parametrize("cfg", [SMALL, KNOBS], ids=["default", "knobs"])
@pytest.mark.parametrize("dtype, bound", [("int8", 0.02), ("bf16", 0.02)])
def test_low_precision_logits_are_close_to_fp32(dtype, bound, cfg):
    model = random_model(cfg=cfg)
    idx = torch.randint(0, SMALL.vocab_size, (2, 40))
    with torch.no_grad():
        reference = sampler.prepare(copy.deepcopy(model), CPU, "fp32")(idx)
        low = sampler.prepare(copy.deepcopy(model), CPU, dtype)
        logits = low(idx).float()
    if cfg.logit_softcap:
        with torch.no_grad():
            raw = random_model(cfg=dataclasses.replace(cfg, logit_softcap=0.0))(idx)
        assert raw.abs().max() > 2 * cfg.logit_softcap and reference.abs().max() <= cfg.logit_softcap
    if dtype == "int8":
        assert isinstance(low.lm_head, sampler.Int8Linear) and isinstance(low.blocks[0].mlp.down, sampler.Int8Linear)
        assert isinstance(low.embed, torch.nn.Embedding)  # the untied embedding keeps its float table too
    assert (logits - reference).norm() / reference.norm() < bound  # measured 0.008 (int8), 0.005 (bf16)


def test_int8_greedy_decoding_agrees_with_fp32():
    model = random_model(sharp=True)
    prompts = [torch.randint(0, SMALL.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()]
    fp32 = greedy(sampler.prepare(copy.deepcopy(model), CPU, "fp32"), prompts, 40)
    int8 = greedy(sampler.prepare(copy.deepcopy(model), CPU, "int8"), prompts, 40)
    assert sum(a == b for a, b in zip(fp32[0], int8[0])) >= 36


def test_dtype_rule_and_refusal():
    assert sampler.pick_dtype(CPU, "auto") == ("int8" if runtime.native_bf16(CPU) else "fp32")
    assert sampler.pick_dtype(CPU, "bf16") == "bf16"
    with pytest.raises(L1Error, match="unknown --dtype 'fp16'"):
        sampler.pick_dtype(CPU, "fp16")


def test_int8_loading_leaves_the_run_folder_alone(tmp_path):
    from test_sampler import save_run
    from l1.tokenizer import Tokenizer
    from conftest import make_documents

    tokenizer = Tokenizer.train(make_documents(50), 300)
    save_run(tmp_path, random_model(), tokenizer)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    lm = sampler.load(str(tmp_path), device="cpu", dtype="int8")
    assert lm.dtype == "int8" and isinstance(lm.model.blocks[0].attn.qkv, sampler.Int8Linear)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == before
    assert sampler.generate(lm, ["the city"], SamplingConfig(max_tokens=5, temperature=0))  # it decodes


def test_no_cpp_compiler_means_eager_decoding_with_one_line(monkeypatch):
    lm = sampler.LoadedModel(random_model(), None, None, 0, CPU)
    monkeypatch.setattr(runtime, "cpp_compiler", lambda: None)
    lines = []
    sampler.compile_decoder(lm, log=lines.append)
    assert lm.decoder is None and len(lines) == 1 and "no C++ compiler" in lines[0]
