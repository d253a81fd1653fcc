"""Text in and out: a checkpoint's own ``tokenizer.json`` (the ``tokenizers`` package: ``pip install
'dagbuild[text]'``), its chat template (Jinja, from ``tokenizer_config.json`` or ``chat_template.jinja``), and
incremental decoding for streaming. Imported lazily: token ids need none of it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import DagbuildError

MISSING = "text needs the `tokenizers` package: pip install 'dagbuild[text]' (or pass --prompt-ids)"


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Text:
    """A checkpoint's tokenizer: ``encode`` (plain or through the chat template), ``decode``."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DagbuildError(f"{str(folder)!r} has no tokenizer.json: text needs the checkpoint's tokenizer "
                                "(or pass --prompt-ids)")
        try:
            import tokenizers
        except ImportError:
            raise DagbuildError(MISSING) from None
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the package's own parse errors
            raise DagbuildError(f"{path}: cannot load the tokenizer ({e})") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except (OSError, ValueError) as e:
                raise DagbuildError(f"{cfg_path}: cannot read ({e})") from None
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.folder = folder

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text``: as the tokenizer adds special tokens (Llama's BOS), or, with ``chat``, of
        one user message rendered through the chat template with the generation prompt (special tokens as
        the template writes them, none added)."""
        if not chat:
            return list(self.tokenizer.encode(text).ids)
        rendered = self.render_chat([{"role": "user", "content": text}])
        return list(self.tokenizer.encode(rendered, add_special_tokens=False).ids)

    def render_chat(self, messages: Sequence[dict]) -> str:
        if self.chat_template is None:
            raise DagbuildError(f"{str(self.folder)!r} has no chat template (tokenizer_config.json chat_template "
                                "or chat_template.jinja): drop --chat")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise DagbuildError("--chat needs the `jinja2` package: pip install 'dagbuild[text]'") from None

        def raise_exception(message: str) -> None:
            raise DagbuildError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                                   "pad_token")}
        try:
            return env.from_string(self.chat_template).render(messages=list(messages), add_generation_prompt=True,
                                                              **{k: v for k, v in specials.items() if v})
        except TemplateError as e:
            raise DagbuildError(f"the chat template of {str(self.folder)!r} failed: {e}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class Stream:
    """Incremental text of one growing token sequence: ``push(token)`` returns the new text that is final
    (held back while the last characters are an incomplete UTF-8 sequence)."""

    def __init__(self, text: Text):
        self.text, self.ids, self.shown = text, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        full = self.text.decode(self.ids)
        if full.endswith("\ufffd") or not full.startswith(self.shown):
            return ""
        new, self.shown = full[len(self.shown):], full
        return new
