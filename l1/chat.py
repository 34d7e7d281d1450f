"""The chat template, defined once: its tokens, its text, the assistant mask of the loss.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Each message
is written as its role's token, its content, then <|end|>:

    <|system|>You are terse.<|end|><|user|>Capital of France?<|end|><|assistant|>Paris.<|end|>

and a reply is asked for by ending the text with <|assistant|>; the model ends its turn with
<|end|>. In a training corpus each conversation is followed by <|endoftext|>, as a document is.

The four tokens are added to a base model's tokenizer (with_chat_tokens) as added tokens that are
matched in any text (not "special" ones, which L1 encodes as plain text inside documents), so the
rendered text alone decides the ids: L1's ids are what Hugging Face's apply_chat_template gives
for CHAT_TEMPLATE (tested). The data pipeline (render), the loss (assistant_mask), the sampler
(prompt_ids) and the exports (CHAT_TEMPLATE) all read this module.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from l1.errors import L1Error
from l1.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
TOKENS = (*ROLE_TOKENS.values(), END)

# The same text as render(), in the form Hugging Face's tokenizer_config.json (chat_template),
# llama.cpp and GGUF files read it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# The same text again in Ollama's Go template language, for the Modelfile beside a GGUF (Ollama
# renders a Modelfile's TEMPLATE, and reads a GGUF's Jinja template only where it knows it).
OLLAMA_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (CHAT_TEMPLATE's output); messages must be valid (see check)."""
    text = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


def check(messages, where: str) -> list[dict]:
    """A training conversation's messages ({role, content} only), or one L1Error naming `where`
    (file and row) and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise L1Error(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {_short(messages)}")
    out = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise L1Error(f"{where}: message {i} must have a role and a content, got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise L1Error(f"{where}: message {i} has role {_short(role)}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise L1Error(f"{where}: message {i}'s content must be text, got {_short(content)}")
        if role == "system" and i > 1:
            raise L1Error(f"{where}: message {i} is a system message; only the first may be")
        marker = next((t for t in (*TOKENS, EOT) if t in content), None)
        if marker:
            raise L1Error(f"{where}: message {i}'s content holds {marker}, a token of the chat template")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise L1Error(f"{where}: no assistant message, so nothing to learn from it")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the template's tokens added after its vocabulary (itself if it has
    them): a new tokenizer, with its own fingerprint."""
    if has_template(tokenizer):
        return tokenizer
    hf = HFTokenizer.from_str(tokenizer.content)
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOKENS])
    return Tokenizer(hf)


def has_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer holds the chat template's tokens (a chat model's)."""
    return all(tokenizer.hf.token_to_id(t) is not None for t in TOKENS)


def token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The id of each template token, by its text."""
    return {t: tokenizer.hf.token_to_id(t) for t in TOKENS}


def require_template(tokenizer: Tokenizer, what: str) -> None:
    """Refuse, in one line, a model whose tokenizer has no chat template."""
    if not has_template(tokenizer):
        raise L1Error(f"{what} is a base model without the chat template: fine-tune it on chat data first "
                      "(train_gpu_compatible.py --init_from it --data a .jsonl of 'messages'; README, 'Chat')")


def assistant_mask(x: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Which targets of inputs x (B, T) the chat loss counts: those inside an assistant turn, the
    <|end|> that closes it included. Target t (the token after x[:, t]) counts when the last
    template token in x[:, :t + 1] is <|assistant|>; targets before the first template token of a
    row (a window that starts inside a turn) do not count, their role being unknown."""
    ids = token_ids(tokenizer)
    assistant = x == ids[ROLE_TOKENS["assistant"]]
    marker = assistant | (x == tokenizer.eot_id)
    for token in (ROLE_TOKENS["system"], ROLE_TOKENS["user"], END):
        marker |= x == ids[token]
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    last = torch.where(marker, positions, -1).cummax(dim=1).values  # the newest marker at or before t
    return (last >= 0) & assistant.gather(1, last.clamp(min=0))
