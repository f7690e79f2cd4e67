"""Tokenizers behind one interface: the toy byte-level one, and BPE from a real checkpoint.

Text is tokenised once, before a dispatcher decides, so token-count methods and the prefix index see
the ids the worker computes. Streaming detokenisation is incremental with offsets (as production
servers do): text is released only once it can no longer change, so a character split over tokens
or a merge across token boundaries is never emitted half-done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property

from pdlb.v1 import common_pb2

BYTE_VOCAB = 256
EOS_TOKEN_ID = 256
MIN_VOCAB_SIZE = BYTE_VOCAB + 1
MAX_CHAT_MESSAGES = 1024

# The toy model's chat template: ChatML-shaped, so chat requests work on every model.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template; the message says why."""


class Tokenizer(ABC):
    """What dispatchers, schedulers and clients need of a model's tokenizer."""

    vocab_size: int
    eos_token_id: int
    bos_token_id: int | None = None
    chat_template: str = ""
    adds_bos: bool = False  # the checkpoint's tokenizer starts every prompt with BOS
    special_tokens: dict[int, str]

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone, no BOS (special-token strings become their ids, as chat
        templates need)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: `text`, after BOS when the checkpoint adds one."""
        return self._with_bos(self._encode_text(text))

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.adds_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of complete token ids; special tokens are dropped unless skip_special_tokens is False."""

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """Render (role, content) messages with the model's chat template (jinja, sandboxed)."""
        if not messages:
            raise ChatTemplateError("messages is empty: give at least one message")
        if len(messages) > MAX_CHAT_MESSAGES:
            raise ChatTemplateError(f"{len(messages)} messages; at most {MAX_CHAT_MESSAGES}")
        try:
            return self._template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.special_tokens.get(self.bos_token_id, "") if self.bos_token_id is not None else "",
                eos_token=self.special_tokens.get(self.eos_token_id, ""),
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # templates raise their own errors for bad roles or orders
            raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from exc

    @cached_property
    def _template(self):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template or BYTE_CHAT_TEMPLATE)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of the rendered chat; BOS once, whether or not the template renders it."""
        return self._with_bos(self._encode_text(self.apply_chat_template(messages)))


class ByteTokenizer(Tokenizer):
    """The toy model's: UTF-8 bytes are token ids 0..255; 256 is EOS; higher ids are special."""

    vocab_size = MIN_VOCAB_SIZE
    eos_token_id = EOS_TOKEN_ID

    def __init__(self) -> None:
        self.special_tokens = {EOS_TOKEN_ID: "<|eos|>"}

    def _encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return bytes(t for t in token_ids if 0 <= t < BYTE_VOCAB).decode("utf-8", errors="replace")
        text, run = [], bytearray()
        for t in token_ids:
            if 0 <= t < BYTE_VOCAB:
                run.append(t)
                continue
            text.append(run.decode("utf-8", errors="replace"))
            run.clear()
            text.append(self.special_tokens.get(t, ""))
        return "".join(text) + run.decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (from a checkpoint's tokenizer.json or GGUF metadata)."""

    def __init__(
        self,
        backend,
        eos_token_id: int,
        bos_token_id: int | None = None,
        chat_template: str = "",
        adds_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.adds_bos = adds_bos
        self.special_tokens = {
            token_id: added.content for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        }

    def _encode_text(self, text: str) -> list[int]:
        # encode_batch, not encode: only the batch call releases the GIL, so a long prompt being
        # tokenised in a worker thread does not stall the service's event loop.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def visible_tokens(token_ids: list[int], finish_reason: int) -> list[int]:
    """The tokens whose text a client sees: a stop token (EOS or one of stop_token_ids, which end
    a generation with FINISH_REASON_STOP) stays out of the text, as in vLLM, though it is a
    generated token (in token_ids and counted in usage)."""
    return token_ids[:-1] if finish_reason == common_pb2.FINISH_REASON_STOP and token_ids else token_ids


class StreamDecoder:
    """Incremental detokenisation: `push` new ids, get the text that became final.

    The tokens since the last-but-one release are decoded with and without the unreleased ones;
    the difference is released unless it ends in an incomplete character (U+FFFD), which waits for
    the next token. Decoding that short window keeps the cost per token constant, and its leading
    context lets merges that re-space text (a byte-level BPE's leading space) come out right."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoded window
        self.read = 0  # end of the released tokens

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        if self.read > self.prefix:
            self.prefix = self.read
        self.read = len(self.ids)
        if self.prefix > 64:  # bounded memory on long streams: only the window matters
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return after[len(before) :]

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip_special_tokens)
        self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
