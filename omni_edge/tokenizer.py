"""Text tokenizer, prompt formats and a streaming detokenizer, all read from the checkpoint's own files.

- `Tokenizer.from_dir(path)`: HF `tokenizers` over the checkpoint's `tokenizer.json`. Special-token ids are looked up by their strings in the
  checkpoint's vocabulary; no id is a constant here.
- Prompt formats turn a list of messages into token ids, ready for prefill. A message is
  `{"role": "system"|"user"|"assistant", "content": str | [part, ...]}`; a part is `{"type": "text", "text": str}`
  or a media part `{"type": "image"|"video"|"audio", KIND: item}` holding a prepared media item (from
  `omni_edge.inputs` / `omni_edge.audio_in`: it knows its token count and a content digest). Media parts expand
  into their spans and `render_spans` returns where the pad runs are, so prefill can put the stage's output
  rows there:
    * `BaichuanPrompt` (Baichuan-Omni, MODEL.md §2.2): `<B_SYS>{system}<C_Q>{user}<C_A>{assistant}<C_Q>...<C_A>`
      with no end-of-turn tokens.
    * `TemplatePrompt` (plain HF checkpoints): the checkpoint's own jinja chat template.
- `StreamDecoder`: token ids in, text out as soon as it is complete UTF-8 (a byte-level BPE can split one
  character over several tokens; nothing is emitted until the character is whole).
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """The checkpoint's tokenizer files are missing, unreadable, or lack a token the model needs."""


def _token_str(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"cannot read {path.name} in {path.parent}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name} in {path.parent}: expected a JSON object, got {type(data).__name__}")
    return data


# GPT-2's byte <-> printable-character table used by every byte-level BPE (Qwen2, SmolLM2, Llama-3 ...):
# bytes that print as themselves keep their character, the other 68 are shifted to U+0100 and up.
def _byte_level_table() -> Dict[str, int]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _byte_level_table()


class Tokenizer:
    """A checkpoint's text tokenizer."""

    def __init__(self, hf: _HFTokenizer, *, source: str, config: Optional[dict] = None,
                 chat_template: Optional[str] = None):
        self.hf = hf
        self.source = source  # the folder the files came from, for error messages
        self.config = config or {}  # tokenizer_config.json (may be empty)
        self.chat_template = chat_template
        added = hf.get_added_tokens_decoder()  # id -> AddedToken
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_ids = frozenset(added)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.byte_level = type(hf.decoder).__name__ == "ByteLevel"
        self._bytes_cache: Dict[int, bytes] = {}

    # ---- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer folder {path} does not exist or is not a folder")
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        tj = path / "tokenizer.json"
        if os.path.lexists(tj):
            from omni_edge.safetensors_file import require_regular

            try:
                require_regular(tj, "tokenizer")
            except (OSError, ValueError) as e:
                raise TokenizerError(str(e)) from None
        if tj.is_file():
            try:
                hf = _HFTokenizer.from_file(str(tj))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise TokenizerError(f"cannot read tokenizer.json in {path}: {str(e).splitlines()[0]}") from None
        else:
            # vocab.json + merges.txt alone do not say how text is pre-split (Qwen2 and GPT-2 use different
            # regexes), so rebuilding a tokenizer from them could silently tokenize differently: refuse.
            raise TokenizerError(f"no tokenizer.json in {path} (the runtime reads the fast-tokenizer file that "
                                 f"HF checkpoints ship; save one with transformers' save_pretrained)")
        template = None
        if (path / "chat_template.jinja").is_file():
            try:
                template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read chat_template.jinja in {path}: {e}") from None
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if not isinstance(template, str):
                template = None
        return cls(hf, source=str(path), config=config, chat_template=template)

    # ---- ids ----------------------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """Id of a (special) token, looked up by its string. Raises TokenizerError if the vocabulary lacks it."""
        i = self.hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"the tokenizer in {self.source} has no token {token!r}")
        return i

    def find_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.hf.token_to_id(token)

    def _config_token(self, key: str) -> Optional[str]:
        return _token_str(self.config.get(key))

    @property
    def eos_token(self) -> Optional[str]:
        return self._config_token("eos_token")

    @property
    def bos_token(self) -> Optional[str]:
        return self._config_token("bos_token")

    # ---- text ---------------------------------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> List[int]:
        """Token ids of `text`, with no BOS/EOS added. With special=False, special-token strings inside the
        text (e.g. a user typing "<C_Q>") are encoded as ordinary text; with special=True they become their
        special ids (used for rendered chat templates, which spell roles as special-token strings)."""
        self.hf.encode_special_tokens = not special
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = False

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token i stands for (byte-level BPE only). Added tokens give their UTF-8 content."""
        b = self._bytes_cache.get(i)
        if b is None:
            s = self.hf.id_to_token(i)
            if s is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in self.added_ids:
                b = s.encode("utf-8")
            else:
                try:
                    b = bytes(_BYTE_OF_CHAR[c] for c in s)
                except KeyError:  # not a byte-level symbol: fall back to the tokenizer's own decoding
                    b = self.hf.decode([i], skip_special_tokens=False).encode("utf-8")
            self._bytes_cache[i] = b
        return b

    def stream(self, *, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed by that token ("" while a multi-byte
    character is still incomplete), `flush()` returns what is left at the end.

    Byte-level BPE: each token's raw bytes go through an incremental UTF-8 decoder, so text comes out exactly
    when its bytes are whole. Other tokenizers (SentencePiece-style, whose decoders strip or merge spaces
    across tokens): decode a short window of recent tokens and emit the growth of the text, holding back while
    it ends in U+FFFD (an incomplete byte-fallback sequence)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True, byte_level: Optional[bool] = None):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.byte_level = tokenizer.byte_level if byte_level is None else byte_level
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: List[int] = []  # window for the generic path
        self._prefix = 0  # window start: text of ids[_prefix:_read] was already emitted
        self._read = 0

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tok.special_ids:
            return ""
        if self.byte_level:
            return self._utf8.decode(self.tok.token_bytes(token_id))
        self._ids.append(token_id)
        skip = self.skip_special
        prev = self.tok.hf.decode(self._ids[self._prefix:self._read], skip_special_tokens=skip)
        text = self.tok.hf.decode(self._ids[self._prefix:], skip_special_tokens=skip)
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prev):]
        return ""

    def flush(self) -> str:
        if self.byte_level:
            return self._utf8.decode(b"", final=True)
        skip = self.skip_special
        prev = self.tok.hf.decode(self._ids[self._prefix:self._read], skip_special_tokens=skip)
        text = self.tok.hf.decode(self._ids[self._prefix:], skip_special_tokens=skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prev):]


# ------------------------------------------------------------------------------------------------
# Prompt formats
# ------------------------------------------------------------------------------------------------

# {"role": str, "content": str | [part, ...], optional "speak": bool (user turns: ask for a spoken reply),
#  optional "ids" + "spans" (assistant turns: the tokens actually fed, and their media spans relative to "ids")}
Message = Dict[str, object]

_ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "video", "audio")
# "audiogen": generated speech kept in the history as its codes (n, 8); it appears only in assistant "spans".
SPAN_KINDS = MEDIA_KINDS + ("audiogen",)


@dataclass
class MediaSpan:
    """Where one media item's rows go in a rendered prompt. `segments` are (start, length) runs of pad
    positions, in the order the item's embedding rows fill them (a video has one run per frame)."""

    kind: str  # one of SPAN_KINDS
    item: object  # the prepared media item (VisualInput, AudioInput) or, for "audiogen", a codes tensor (n, 8)
    digest: str  # content key: two different images never share one
    segments: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    def shifted(self, offset: int) -> "MediaSpan":
        return MediaSpan(self.kind, self.item, self.digest, [(a + offset, n) for a, n in self.segments])


@dataclass
class Rendered:
    """A rendered conversation: token ids and the media spans inside them."""

    ids: List[int]
    spans: List[MediaSpan] = field(default_factory=list)

    def keys(self) -> List[object]:
        """One key per position for KV-cache reuse: the token id, or (id, digest, row) inside a media span,
        so identical pad runs of different media never match."""
        keys: List[object] = list(self.ids)
        for sp in self.spans:
            row = 0
            for a, n in sp.segments:
                for j in range(n):
                    keys[a + j] = (self.ids[a + j], sp.digest, row)
                    row += 1
        return keys


def text_of(content) -> str:
    """The text of a message's content (a string, or the text parts of a part list, joined)."""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def media_of(content) -> List[Tuple[str, object]]:
    """(kind, item) of every media part of a message's content, in order."""
    if isinstance(content, str):
        return []
    return [(p["type"], p[p["type"]]) for p in content if p.get("type") in MEDIA_KINDS]


def _check_content(n: int, content) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"messages[{n}]: content must be a string or a list of parts, got {type(content).__name__}")
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{n}].content[{k}]: a text part needs a string 'text'")
        elif kind in MEDIA_KINDS:
            item = part.get(kind)
            if item is None or not isinstance(getattr(item, "digest", None), str):
                raise ValueError(f"messages[{n}].content[{k}]: a {kind} part needs a prepared {kind} item "
                                 f"(load it with the pipeline's input loaders)")
        else:
            raise ValueError(f"messages[{n}].content[{k}]: part type must be one of "
                             f"{('text',) + MEDIA_KINDS}, got {kind!r}")


def _check_messages(messages: Sequence[Message]) -> None:
    for n, m in enumerate(messages):
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{n}]: role must be one of {_ROLES}, got {role!r}")
        _check_content(n, m.get("content", ""))
        if role == "system" and n != 0:
            raise ValueError(f"messages[{n}]: a system message may only come first")
        if role == "system" and media_of(m.get("content", "")):
            raise ValueError(f"messages[{n}]: a system message holds text only")


def has_media(messages: Sequence[Message]) -> bool:
    return any(media_of(m.get("content", "")) or m.get("spans") for m in messages)


class BaichuanPrompt:
    """Baichuan-Omni's demo format (MODEL.md §2.2):

        <B_SYS>{system}<C_Q>{user}[<audiotext_start_baichuan>]<C_A>{assistant}<C_Q>{user}<C_A>

    There are no end-of-turn tokens: the next role prefix starts the next turn, and the reply ends with
    `<|endoftext|>`, which is not part of the history. The reference demos always open with a system entry,
    so `<B_SYS>` is written even when the system text is empty. Role prefixes are emitted as their ids and
    message text is encoded as plain text, so text that happens to spell a special token cannot forge a turn.
    An assistant message may carry "ids" (the tokens actually fed, with their media "spans"): they are used as
    they are, so a conversation's ids stay identical to what the KV cache holds. A user message with
    "speak": True asks for a spoken reply (`<audiotext_start_baichuan>` before the next `<C_A>`).

    Media parts expand into spans (MODEL.md §1.3, §2.2), with every id looked up in the tokenizer:
      image: <img_start_baichuan> <img_pad_baichuan> x N <img_end_baichuan>, N = the item's token count;
      video: per frame <img_start_baichuan> <video_palce_baichuan> x N_f <img_end_baichuan>, frames back to back
             (no video start/end ids reach the model);
      audio: <audio_start_baichuan> <audio_pad_baichuan> x N <audio_end_baichuan>, all 30 s pieces in one span."""

    name = "baichuan"

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.sys_id = tokenizer.token_id("<B_SYS>")
        self.user_id = tokenizer.token_id("<C_Q>")
        self.assistant_id = tokenizer.token_id("<C_A>")
        self.eos_id = tokenizer.token_id("<|endoftext|>")
        # A reply is over at eos; a new role prefix would also start a turn that is not the assistant's, and
        # <audiogen_start_baichuan> starts speech, which text chat does not produce (MODEL.md §2.3 stops there).
        stops = [self.eos_id, self.sys_id, self.user_id, self.assistant_id]
        audiogen = tokenizer.find_id("<audiogen_start_baichuan>")
        if audiogen is not None:
            stops.append(audiogen)
        self.stop_ids = tuple(stops)
        self._media_ids: Dict[str, Tuple[int, int, int]] = {}

    def media_ids(self, kind: str) -> Tuple[int, int, int]:
        """(start, pad, end) ids of a media kind's span, from the tokenizer (TokenizerError when it lacks one)."""
        got = self._media_ids.get(kind)
        if got is None:
            names = {"image": ("<img_start_baichuan>", "<img_pad_baichuan>", "<img_end_baichuan>"),
                     "video": ("<img_start_baichuan>", "<video_palce_baichuan>", "<img_end_baichuan>"),
                     "audio": ("<audio_start_baichuan>", "<audio_pad_baichuan>", "<audio_end_baichuan>"),
                     "audiotext": ("<audiotext_start_baichuan>",) * 3}[kind]
            got = self._media_ids[kind] = tuple(self.tok.token_id(n) for n in names)
        return got

    def _media(self, kind: str, item, base: int, spans: List[MediaSpan]) -> List[int]:
        start, pad, end = self.media_ids(kind)
        frames = list(getattr(item, "frame_tokens", None) or []) if kind == "video" else []
        if not frames:
            frames = [int(item.n_tokens)]
        ids: List[int] = []
        span = MediaSpan(kind, item, item.digest)
        for n in frames:
            if n < 1:
                raise ValueError(f"{kind} {getattr(item, 'source', '')}: no tokens to place")
            ids.append(start)
            span.segments.append((base + len(ids), n))
            ids += [pad] * n
            ids.append(end)
        spans.append(span)
        return ids

    def _content(self, content, base: int, spans: List[MediaSpan]) -> List[int]:
        if isinstance(content, str):
            return self.tok.encode(content)
        ids: List[int] = []
        for part in content:
            kind = part["type"]
            if kind == "text":
                ids += self.tok.encode(part["text"])
            else:
                ids += self._media(kind, part[kind], base + len(ids), spans)
        return ids

    def render_spans(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> Rendered:
        _check_messages(messages)
        ids: List[int] = [self.sys_id]
        spans: List[MediaSpan] = []
        body = messages
        if messages and messages[0]["role"] == "system":
            ids += self.tok.encode(text_of(messages[0].get("content", "")))
            body = messages[1:]
        speak = False
        for m in body:
            if m["role"] == "user":
                ids.append(self.user_id)
                ids += self._content(m.get("content", ""), len(ids), spans)
                speak = bool(m.get("speak"))
            else:
                if speak:
                    ids.append(self.media_ids("audiotext")[0])
                ids.append(self.assistant_id)
                given = m.get("ids")
                if given is not None:
                    spans += [sp.shifted(len(ids)) for sp in m.get("spans", ())]
                    ids += list(given)
                else:
                    ids += self._content(m.get("content", ""), len(ids), spans)
                speak = False
        if add_generation_prompt:
            if speak:
                ids.append(self.media_ids("audiotext")[0])
            ids.append(self.assistant_id)
        return Rendered(ids, spans)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> List[int]:
        return self.render_spans(messages, add_generation_prompt=add_generation_prompt).ids


class TemplatePrompt:
    """A plain HF checkpoint's own chat template (jinja2), rendered the way HF renders it: sandboxed, with
    trim_blocks / lstrip_blocks, the loop-control extension, `raise_exception`, `strftime_now` and the
    tokenizer's special-token strings as variables; the text is then encoded with special tokens parsed and
    nothing added around it."""

    name = "chat_template"

    def __init__(self, tokenizer: Tokenizer, template: str, *, eos_ids: Sequence[int] = ()):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(fmt):
            import datetime

            return datetime.datetime.now().strftime(fmt)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise TokenizerError(f"the chat template in {tokenizer.source} does not parse: {e}") from None
        self.tok = tokenizer
        self.variables = {k: _token_str(tokenizer.config.get(k)) for k in
                          ("bos_token", "eos_token", "pad_token", "unk_token")}
        stops = list(eos_ids)
        eos = tokenizer.find_id(tokenizer.eos_token)
        if eos is not None and eos not in stops:
            stops.append(eos)
        self.stop_ids = tuple(stops)

    # A rendered prompt longer than this, or a render slower than this, is a broken (or hostile) template: the
    # sandbox stops attribute tricks, not loops. Real templates render a turn in well under a millisecond.
    MAX_RENDER_CHARS = 4 << 20
    MAX_RENDER_SECONDS = 5.0

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        _check_messages(messages)
        if has_media(messages):
            raise ValueError(f"{self.tok.source} is a text model (chat-template prompt format): it takes no "
                             f"images, video or audio; media need a Baichuan-Omni checkpoint or bundle")
        plain = [{"role": m["role"], "content": text_of(m.get("content", ""))} for m in messages]
        limit = self.MAX_RENDER_CHARS + sum(len(m["content"]) for m in plain)
        try:
            text = _bounded_render(self.template, limit, self.MAX_RENDER_SECONDS,
                                   dict(messages=plain, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.variables))
        except TemplateError as e:
            raise ValueError(f"the chat template of {self.tok.source} rejected the conversation: {e}") from None
        except _RenderLimit as e:
            raise TokenizerError(f"the chat template of {self.tok.source} {e}; it is not usable") from None
        except (MemoryError, RecursionError) as e:
            raise TokenizerError(f"the chat template of {self.tok.source} ran out of "
                                 f"{'memory' if isinstance(e, MemoryError) else 'stack'} while rendering; "
                                 f"it is not usable") from None
        if not text.strip():
            raise TokenizerError(f"the chat template of {self.tok.source} rendered an empty prompt for this "
                                 f"conversation ({len(plain)} message(s)); the model would get no input")
        return text

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> List[int]:
        return self.tok.encode(self.render_text(messages, add_generation_prompt=add_generation_prompt),
                               special=True)

    def render_spans(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> Rendered:
        return Rendered(self.render(messages, add_generation_prompt=add_generation_prompt))


class _RenderLimit(Exception):
    pass


def _bounded_render(template, max_chars: int, max_seconds: float, variables: dict) -> str:
    """template.render(**variables), stopped with _RenderLimit past `max_chars` of output or `max_seconds`.

    Output is checked as the template streams it; time is checked on every line the compiled template runs
    (a trace function on the template's own frames only), so a loop that prints nothing is stopped too."""
    import sys
    import time

    deadline = time.monotonic() + max_seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderLimit(f"took more than {max_seconds:g} s to render")
        return on_line

    def on_call(frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return on_line(frame, event, arg)
        return None

    previous = sys.gettrace()
    if previous is None:  # leave a debugger's or coverage tool's tracer alone: the size bound still holds
        sys.settrace(on_call)
    try:
        parts, n = [], 0
        for chunk in template.generate(**variables):
            n += len(chunk)
            if n > max_chars:
                raise _RenderLimit(f"produced more than {max_chars} characters")
            parts.append(chunk)
            if time.monotonic() > deadline:
                raise _RenderLimit(f"took more than {max_seconds:g} s to render")
        return "".join(parts)
    finally:
        if previous is None:
            sys.settrace(None)


def prompt_format(tokenizer: Tokenizer, kind: str, *, eos_ids: Sequence[int] = ()):
    """The prompt format for a checkpoint of `kind` ("omni" = Baichuan-Omni, "hf" = plain HF model)."""
    if kind == "omni":
        return BaichuanPrompt(tokenizer)
    if tokenizer.chat_template is None:
        raise TokenizerError(f"{tokenizer.source} has no chat template (chat_template.jinja, or chat_template "
                             f"in tokenizer_config.json), so there is no way to build a chat prompt for it")
    return TemplatePrompt(tokenizer, tokenizer.chat_template, eos_ids=eos_ids)
