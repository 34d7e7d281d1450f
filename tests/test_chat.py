"""Chat: the template (one definition: text, ids, Jinja, the loss mask), chat data and its refusals,
supervised fine-tuning that works (held-out questions answered through generate_simple.py --chat),
the loss mask's effect, and the Hugging Face export's chat_template and chat pipeline."""

import json

import pytest
import torch

import chat_facts
import train_gpu_compatible
from conftest import flags, one_error_line, run_script, tiny_args
from l1 import chat, sampler
from l1.config import SamplingConfig
from l1.tokenizer import EOT, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "What colour is Zorbo?"},
     {"role": "assistant", "content": "red."}, {"role": "user", "content": " spaces  and ünïcode ✓ "},
     {"role": "assistant", "content": ""}],
]


def train(argv) -> int:
    return train_gpu_compatible.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory):
    return chat_facts.write(tmp_path_factory.mktemp("chat") / "chat.jsonl")


@pytest.fixture(scope="module")
def chat_base(corpus, tmp_path_factory):
    """A base run with a context of 128 (a few turns), barely trained: the facts come from SFT alone."""
    tmp = tmp_path_factory.mktemp("chatbase")
    assert train(tiny_args(corpus, tmp, max_steps=4, block_size=128, seq_len=128)) == 0
    return tmp / "run"


def sft_args(base, data, out, **extra) -> list[str]:
    """150 steps of 16 x 128 tokens at lr 5e-3 (the base knows nothing yet: a from-scratch lr)."""
    values = {"preset": "tiny", "init_from": base, "data": data, "data_dir": out.parent / "data", "out": out,
              "max_steps": 150, "batch_size": 16, "seq_len": 128, "grad_accum": 1, "lr": 5e-3, "eval_every": 150,
              "eval_batches": 2, "save_every": 150, "log_every": 50, "val_fraction": 0.1, "device": "cpu"}
    values.update(extra)
    return flags(values)


@pytest.fixture(scope="module")
def sft(chat_base, chat_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert train(sft_args(chat_base, chat_set, out)) == 0
    return out


@pytest.fixture(scope="module")
def sft_unmasked(chat_base, chat_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_unmasked") / "run"
    assert train(sft_args(chat_base, chat_set, out) + ["--no-assistant_only_loss"]) == 0
    return out


# ---- the template ---------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation", [False, True])
def test_render_is_the_jinja_template(messages, generation):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = ImmutableSandboxedEnvironment().from_string(chat.CHAT_TEMPLATE)
    assert chat.render(messages, generation) == jinja.render(messages=messages, add_generation_prompt=generation)


def test_the_mask_counts_assistant_tokens_and_the_end_of_their_turns_only(sft):
    tokenizer = Tokenizer.load(sft / "tokenizer.json")
    ids = chat.token_ids(tokenizer)

    def seg(text, counted=False):
        return [(t, counted) for t in tokenizer.encode(text)]

    def tok(name, counted=False):
        return [(ids[name], counted)]

    labelled = (tok("<|system|>") + seg("Be brief.") + tok(chat.END) + tok("<|user|>") + seg("Colour of Zorbo?")
                + tok(chat.END) + tok("<|assistant|>") + seg("It is red.", True) + tok(chat.END, True)
                + tok("<|user|>") + seg("And Mivla?") + tok(chat.END) + tok("<|assistant|>") + seg("Blue.", True)
                + tok(chat.END, True) + [(tokenizer.eot_id, False)] + tok("<|user|>") + seg("Next one"))
    tokens = torch.tensor([t for t, _ in labelled])
    counted = torch.tensor([c for _, c in labelled])
    mask = chat.assistant_mask(tokens[None, :-1], tokenizer)[0]
    assert torch.equal(mask, counted[1:])  # target t is token t + 1
    # A window that starts inside an assistant turn: its role is unknown until the next template token.
    start = next(i for i, (t, _) in enumerate(labelled) if t == ids["<|assistant|>"]) + 2
    window = chat.assistant_mask(tokens[None, start:-1], tokenizer)[0]
    first_marker = next(i for i, t in enumerate(tokens[start:-1].tolist()) if t in ids.values())
    assert not window[:first_marker].any() and torch.equal(window[first_marker:], counted[start + 1 + first_marker:])


def test_chat_tokens_are_added_once_with_their_own_fingerprint_and_match_in_any_text(chat_base):
    base = Tokenizer.load(chat_base / "tokenizer.json")
    tokenizer = chat.with_chat_tokens(base)
    assert tokenizer.fingerprint != base.fingerprint and chat.with_chat_tokens(tokenizer) is tokenizer
    assert tokenizer.vocab_size == base.vocab_size + len(chat.TOKENS)
    assert sorted(chat.token_ids(tokenizer).values()) == list(range(base.vocab_size, base.vocab_size + 4))
    # Documents are encoded with special tokens as text (<|endoftext|> stays text), the template's still match.
    ids = tokenizer.encode_documents([f"<|user|>a{EOT}<|end|>"])[0]
    assert ids[0] == chat.token_ids(tokenizer)["<|user|>"] and ids[-1] == chat.token_ids(tokenizer)[chat.END]
    assert tokenizer.eot_id not in ids


# ---- chat data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"messages": []}, "row 2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "row 2: message 1 has role 'bot'; roles are system, user, "
                                                         "assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: no assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "row 2: message 2 is a system message; only the first"),
    ({"messages": [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "no"}]},
     "row 2: message 1's content holds <|end|>, a token of the chat template"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "no"}]},
     "row 2: message 1 must have a role and a content, got {'role': 'user'}"),
])
def test_a_malformed_chat_row_is_one_line_naming_the_file_and_row(chat_base, tmp_path, capsys, row, message):
    good = {"messages": CONVERSATIONS[0]}
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good, row, good]) + "\n")
    assert train(sft_args(chat_base, data, tmp_path / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{data}, {message}" in line
    assert not (tmp_path / "run" / "latest_checkpoint.pt").exists()


def test_chat_data_for_a_run_from_scratch_points_to_init_from(chat_set, corpus, tmp_path, capsys):
    assert train(tiny_args(chat_set, tmp_path, text_column="messages")) == 2
    assert "fine-tune one with --init_from RUN" in one_error_line(capsys.readouterr().err)
    assert train(tiny_args(chat_set, tmp_path)) == 2  # the default text column: not there, the hint is given
    assert "chat rows (messages) are for fine-tuning a base model: --init_from RUN" in \
        one_error_line(capsys.readouterr().err)


# ---- SFT works, and the mask is what makes it a chat model ------------------------------------------

def test_sft_answers_held_out_phrasings_through_generate_simple_chat(sft, chat_base):
    held_out = chat_facts.questions(trained=False)
    result = run_script("generate_simple.py", "--chat", "--model_path", sft, "--temperature", "0",
                        "--max_tokens", "8", "--device", "cpu", "--dtype", "fp32",
                        input="".join(f"{q}\n" for q, _ in held_out))
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == len(held_out)
    correct = sum(reply.strip() == f"{answer}." for reply, (_, answer) in zip(replies, held_out))
    # Chance is 1 in 6 colours (4 of 24); the run measured 23 of 24.
    assert correct >= 18, list(zip(replies, held_out))
    # 24 turns outgrow a context of 128: the oldest are dropped, and that is said once.
    assert result.stderr.count("its oldest turns are dropped from now on") == 1
    config = json.loads((sft / "training_args.json").read_text())
    assert config["origin"]["chat"] is True and config["data"]["text_column"] == "messages"
    assert config["model"]["vocab_size"] == 512 + len(chat.TOKENS)


def _writes_user_turns(run) -> float:
    """The fraction of held-out conversations in which the model, given a new user turn's token,
    goes on to write a question (the word 'colour' only ever appears in users' turns)."""
    lm = sampler.load(str(run), device="cpu", dtype="fp32")
    prompts = [lm.tokenizer.encode(chat.render([{"role": "user", "content": q},
                                                {"role": "assistant", "content": a + "."}]) + "<|user|>")
               for q, a in chat_facts.questions(trained=False)]
    out = sampler.generate_ids(lm.model, prompts, SamplingConfig(temperature=0, max_tokens=8),
                               vocab_size=lm.tokenizer.vocab_size, eot_id=None)
    return sum("colour" in lm.tokenizer.decode(ids) for ids in out) / len(out)


def test_without_the_loss_mask_the_model_learns_to_write_user_turns_with_it_it_does_not(sft, sft_unmasked):
    assert _writes_user_turns(sft_unmasked) >= 0.8
    assert _writes_user_turns(sft) <= 0.1


def test_chat_prompt_answers_one_turn_and_a_base_model_is_refused(sft, chat_base):
    one = run_script("generate_simple.py", "--chat", "--prompt", "What colour is Zorbo?", "--system",
                     "Answer with one word.", "--model_path", sft, "--temperature", "0", "--device", "cpu")
    assert one.returncode == 0 and one.stdout == "red.\n", one.stderr
    base = run_script("generate_simple.py", "--chat", "--prompt", "hi", "--model_path", chat_base, "--device", "cpu")
    assert base.returncode == 2
    assert "is a base model without the chat template" in one_error_line(base.stderr)


# ---- the Hugging Face export ----------------------------------------------------------------------

@pytest.mark.parametrize("generation", [False, True])
def test_exported_chat_template_gives_exactly_l1s_ids(sft, tmp_path, generation):
    from transformers import AutoTokenizer

    from l1 import export

    out = export.export(str(sft), str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(sft / "tokenizer.json")
    for messages in CONVERSATIONS:
        ids = hf.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, return_dict=False)
        assert list(ids) == ours.encode(chat.render(messages, generation))
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chat.CHAT_TEMPLATE


def test_transformers_chat_pipeline_on_the_export_answers_as_l1_does(sft, tmp_path):
    from transformers import pipeline

    from l1 import export

    out = export.export(str(sft), str(tmp_path / "hf"))
    messages = [{"role": "user", "content": chat_facts.questions(trained=False)[0][0]}]
    generated = pipeline("text-generation", model=str(out), device="cpu")(messages, max_new_tokens=8,
                                                                         do_sample=False)
    reply = generated[0]["generated_text"][-1]
    lm = sampler.load(str(sft), device="cpu", dtype="fp32")
    expected = sampler.Conversation(lm, SamplingConfig(temperature=0, max_tokens=8)).reply(messages[0]["content"])
    assert reply == {"role": "assistant", "content": expected} and expected == chat_facts.questions(False)[0][1] + "."


def test_chat_parquet_trains_and_a_single_conversation_is_refused(chat_base, chat_set, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in chat_set.read_text().splitlines()]
    pq.write_table(pa.table({"messages": [r["messages"] for r in rows]}), tmp_path / "chat.parquet")
    assert train(sft_args(chat_base, tmp_path / "chat.parquet", tmp_path / "run", max_steps=1)) == 0
    meta = json.loads(next((tmp_path / "data").glob("*/meta.json")).read_text())
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == len(rows)
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    assert train(sft_args(chat_base, single, tmp_path / "run1")) == 2
    assert "holds 1 conversation(s); at least 2 are needed" in one_error_line(capsys.readouterr().err)
