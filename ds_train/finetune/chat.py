"""Turn an SFT example into text plus the character spans the loss is computed on.

An example is either `{prompt, response[, system]}` or `{messages: [{role, content}, ...]}`;
both become a list of chat messages. With the tokenizer's own chat template (`apply_chat_template`)
the assistant spans are found by rendering the conversation up to each assistant turn: the text
added by that turn (its content and end-of-turn marker) is a target. transformers' built-in
`return_assistant_tokens_mask` only works for templates with `{% generation %}` markers, which
most templates lack, hence this prefix approach (the one TRL and axolotl use).

Tokenizers without a chat template get the plain template (documented in docs/finetune.md):

    ### System:\\n{system}\\n\\n        (when there is a system message)
    ### User:\\n{user}\\n\\n
    ### Assistant:\\n{assistant}{eos}\\n\\n

where the assistant's content and EOS are the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_train.config.loader import ConfigError

ROLES = ("system", "user", "assistant")
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_SEPARATOR = "\n\n"
# The plain template in Jinja, written into exported tokenizers so `apply_chat_template` formats
# prompts at inference exactly as in training (a unit test checks the two agree).
PLAIN_JINJA = (
    "{% for message in messages %}"
    "{{ '### ' + {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']] + ':\\n' }}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


class ExampleError(ValueError):
    """A malformed example; the caller adds the file and line."""


@dataclass
class Rendered:
    text: str
    targets: list[tuple[int, int]]  # [start, end) character spans that are loss targets
    add_special_tokens: bool  # plain text gets the tokenizer's BOS; chat templates write their own


def to_messages(record: dict, *, prompt: str, response: str, system: str, messages: str) -> list[dict]:
    """The example as chat messages, validated."""
    if messages in record:
        msgs = record[messages]
        if not isinstance(msgs, list) or not msgs:
            raise ExampleError(f"'{messages}' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ExampleError(
                    f"'{messages}[{i}]' must be {{role: system|user|assistant, content: string}}, got {m!r}"[
                        :200
                    ]
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    missing = [f for f in (prompt, response) if f not in record]
    if missing:
        raise ExampleError(
            f"no '{messages}' and no '{missing[0]}' field (SFT examples are {{{prompt}, {response}}} "
            f"or {{{messages}: [...]}}); fields present: {sorted(record)[:8]}"
        )
    for f in (prompt, response):
        if not isinstance(record[f], str):
            raise ExampleError(f"'{f}' must be a string, got {type(record[f]).__name__}")
    out = []
    if isinstance(record.get(system), str) and record[system]:
        out.append({"role": "system", "content": record[system]})
    out += [{"role": "user", "content": record[prompt]}, {"role": "assistant", "content": record[response]}]
    return out


class ChatFormat:
    """Renders messages with the tokenizer's chat template or the plain template."""

    def __init__(self, tokenizer, mode: str):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "tokenizer" and not has_template:
            raise ConfigError(
                "finetune.chat_template=tokenizer but the tokenizer has no chat template "
                "(use auto or plain, or add chat_template to tokenizer_config.json)"
            )
        self.tokenizer = tokenizer
        self.uses_tokenizer_template = has_template and mode != "plain"
        self.eos = tokenizer.eos_token or tokenizer.sep_token or ""

    @property
    def name(self) -> str:
        return "tokenizer" if self.uses_tokenizer_template else "plain"

    def export_template(self) -> str:
        """The chat template an exported tokenizer should carry: the one training used."""
        if self.uses_tokenizer_template:
            return self.tokenizer.chat_template
        adds_bos = (
            self.tokenizer.bos_token_id is not None
            and self.tokenizer("a").input_ids[:1] == [self.tokenizer.bos_token_id]
            and self.tokenizer("a", add_special_tokens=False).input_ids[:1] != [self.tokenizer.bos_token_id]
        )
        return ("{{ bos_token }}" if adds_bos else "") + PLAIN_JINJA

    def render(self, messages: list[dict], *, train_on_inputs: bool = False) -> Rendered:
        text, spans = (self._template if self.uses_tokenizer_template else self._plain)(messages)
        if train_on_inputs:
            spans = [(0, len(text))]
        return Rendered(text, spans, add_special_tokens=not self.uses_tokenizer_template)

    def _plain(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        parts, spans, pos = [], [], 0
        for m in messages:
            header = PLAIN_HEADERS[m["role"]]
            body = m["content"] + (self.eos if m["role"] == "assistant" else "")
            if m["role"] == "assistant":
                spans.append((pos + len(header), pos + len(header) + len(body)))
            piece = header + body + PLAIN_SEPARATOR
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans

    def _template(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        def render(msgs: list[dict], generation_prompt: bool) -> str:
            return self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )

        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True) if i else ""
            through = render(messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ExampleError(
                    "the tokenizer's chat template renders a conversation differently from its "
                    "prefixes, so the assistant tokens cannot be located; set finetune.chat_template=plain"
                )
            spans.append((len(before), len(through)))
        return full, spans
