"""Text side of the API process: tokenize, render chat templates, detokenize with stop strings.

Built on the `tokenizers` library and jinja2 directly (no transformers, no torch) so the API
process stays light. Chat templates render the way Hugging Face renders them, so prompts match
what the model was trained on.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# Prompt tokens decoded in front of the first generated token (as vLLM does): decoders that
# strip a leading space at the start of a text (SentencePiece's Metaspace) would otherwise eat
# the space of the first generated word.
CONTEXT_TOKENS = 5
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The chat template cannot render these messages; the user's input is at fault (400)."""


# ---- chat templates, as Hugging Face compiles them ------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering only needs the body, but without the tag such templates would not compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's filter: unlike jinja's own tojson it does not HTML-escape (prompts are not HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the environment HF uses (sandboxed, trim/lstrip blocks, its helpers)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _read_chat_template(directory: Path, config: dict) -> str | None:
    """`chat_template.jinja` (newer save_pretrained) wins over the config's `chat_template`,
    which may also be a list of named templates (then "default" is the chat one)."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}.get("default")
    return template


# ---- the processor --------------------------------------------------------------------------
class TextProcessor:
    """Tokenizer plus chat template of one model, as the API process needs them."""

    def __init__(self, tokenizer: Tokenizer, config: dict, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = {k: t for k in _SPECIAL_TOKEN_KEYS
                               if (t := _token_text(config.get(k))) is not None}
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos is not None else None
        self.add_bos = bool(config.get("add_bos_token")) and self.bos_token_id is not None
        self._template: jinja2.Template | None = None
        self._template_error: str | None = None if chat_template else "the model has no chat template"
        if chat_template:
            try:
                self._template = compile_chat_template(chat_template)
            except jinja2.TemplateError as exc:  # completions still work; chat answers 400
                self._template_error = f"the model's chat template does not compile: {exc}"

    @classmethod
    def from_dir(cls, directory: str | Path) -> TextProcessor:
        """Load `tokenizer.json` + `tokenizer_config.json` as HF's save_pretrained writes them."""
        directory = Path(directory)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls(tokenizer, config, _read_chat_template(directory, config))

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt. The tokenizer's post-processor is not applied; BOS is
        prepended only when tokenizer_config.json says add_bos_token."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for these messages; any template failure is a ChatTemplateError."""
        if self._template is None:
            raise ChatTemplateError(self._template_error)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except Exception as exc:  # noqa: BLE001 - a template fails on odd input in many ways
            raise ChatTemplateError(f"chat template error: {exc}") from exc

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat. The template writes BOS itself, so none is added."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def detokenizer(self, prompt_ids: Sequence[int] = (), stop: Iterable[str] = ()) -> IncrementalDetokenizer:
        """A fresh detokenizer for one request, primed with the tail of its prompt."""
        return IncrementalDetokenizer(self.tokenizer, prompt_ids[-CONTEXT_TOKENS:], stop)


# ---- incremental detokenizer ----------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas that are safe to send.

    Two things are held back until they are settled:
    - a UTF-8 character split across tokens: decoding its first bytes ends in U+FFFD;
    - a tail of text that could be the start of a stop string (a streamed client never sees
      part of a stop string).
    Terms: `_ids` holds context (prompt tail) + generated ids; the text of `_ids[_prefix:_read]`
    was already turned into deltas and is decoded again only as context for the next ones;
    `_pending` is settled text held back as a possible stop-string start.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (),
                 stop: Iterable[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.text = ""  # everything returned so far
        self.num_tokens = 0  # generated tokens that count: up to the one completing a stop string
        self.stopped = False  # a stop string matched; text from it on is dropped

    def feed(self, token_ids: Iterable[int]) -> str:
        """Add generated tokens; return the newly finalized text (possibly "")."""
        out = []
        for token_id in token_ids:
            if self.stopped:
                break
            self.num_tokens += 1
            self._ids.append(token_id)
            out.append(self._accept(self._tail_text(final=False)))
        return "".join(out)

    def finish(self) -> str:
        """Generation ended without a stop string so far: release everything held back.
        Bytes of a character the model never completed are dropped, not shown as U+FFFD."""
        if self.stopped:
            return ""
        delta = self._accept(self._tail_text(final=True).rstrip("\ufffd"))
        if not self.stopped:
            delta += self._emit(self._pending)
            self._pending = ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _tail_text(self, final: bool) -> str:
        """Text of the tokens after `_read`, decoded with the tokens before it as context.
        Unless `final`, returns "" while the text ends in an incomplete UTF-8 sequence."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text):]

    def _accept(self, text: str) -> str:
        """Check settled text for stop strings; return the part that is safe to send."""
        buffer = self._pending + text
        cut = self._earliest_stop(buffer)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return self._emit(buffer[:cut])
        keep = self._stop_prefix_len(buffer)
        self._pending = buffer[len(buffer) - keep:]
        return self._emit(buffer[:len(buffer) - keep])

    def _earliest_stop(self, buffer: str) -> int | None:
        """Start of the earliest stop string in `buffer`. Text already sent cannot hold the start
        of a match: any suffix of it that began a stop string was held back in `_pending`."""
        hits = [i for s in self._stop if (i := buffer.find(s)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:k]):
                    best = k
                    break
        return best

    def _emit(self, text: str) -> str:
        self.text += text
        return text
