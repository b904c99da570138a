"""Chat templates: the model's own, rendered exactly as transformers renders them.

The compiler copies the model's chat template and special tokens into the plan directory
(`plandir.TOKENIZER_CONFIG_FILE`, a subset of HF's tokenizer_config.json, written by
`halo_compile.emit`). `halo-run generate --chat`, `local --chat` and `serve` render a
conversation with it the way `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
does: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension, a `tojson` that does not escape HTML, `raise_exception` and
`strftime_now`, and the special tokens (bos_token, eos_token, ...) as variables; the text is then
tokenized without adding a BOS (the template writes it where the model wants one). A plan
compiled before the file existed, or a model without a template, falls back to ChatML with one
warning. jinja2 is imported only here, when a chat is rendered, so workers never load it.

Example:
    >>> from halo_runtime.core.chat import ChatTemplate, TokenizerConfig
    >>> cfg = TokenizerConfig(chat_template="{{ bos_token }}{% for m in messages %}[{{ m.role }}] "
    ...                       "{{ m.content }}\\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    ...                       bos_token="<s>")
    >>> ChatTemplate(cfg).render([{"role": "user", "content": "hi"}])
    '<s>[user] hi\\n[assistant] '
    >>> TokenizerConfig.from_json(cfg.to_json()) == cfg
    True
    >>> ChatTemplate(TokenizerConfig(chat_template="{{ raise_exception('no system role') }}")).render([])
    Traceback (most recent call last):
    ...
    ValueError: chat template: no system role
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

from .plandir import TOKENIZER_CONFIG_FILE, PlanError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The fallback: ChatML without a default system message (what halo-run used before plans carried a template)."""
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenizerConfig:
    """What the runtime needs of a model's tokenizer_config.json."""

    chat_template: str | None = None
    """Jinja2 source of the chat template; None when the model has none."""
    bos_token: str | None = None
    """Text of the beginning-of-sequence token (templates write it themselves)."""
    eos_token: str | None = None
    """Text of the end-of-sequence token."""
    unk_token: str | None = None
    """Text of the unknown token."""
    pad_token: str | None = None
    """Text of the padding token."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{f.name} must be a string or null, got {type(value).__name__}")

    def to_json(self) -> str:
        """Deterministic text (the plan directory's manifest hashes it)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=1, sort_keys=True,
                          ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = TOKENIZER_CONFIG_FILE) -> "TokenizerConfig":
        """Read HALO's file or an HF tokenizer_config.json (AddedToken dicts and named template lists
        included); PlanError names `source`."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            template = data.get("chat_template")
            if isinstance(template, list):  # HF's named templates: the default one is the chat template
                template = next((t.get("template") for t in template if isinstance(t, dict)
                                 and t.get("name") == "default"), None)
            tokens = {k: _token_text(data.get(k)) for k in SPECIAL_TOKENS}
            return cls(chat_template=template, **tokens)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise PlanError(f"{source}: not a tokenizer config ({e})") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer_config(plan_dir: str | Path) -> TokenizerConfig | None:
    """The plan directory's tokenizer config, or None if the plan predates it."""
    path = Path(plan_dir) / TOKENIZER_CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: unreadable ({e})") from None
    return TokenizerConfig.from_json(text, str(path))


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        print(f"halo-run: warning: {msg}", file=sys.stderr, flush=True)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, config: TokenizerConfig):
        self.config = config
        self.source = config.chat_template or CHATML
        self.template = _compile(self.source)

    @classmethod
    def for_plan(cls, plan_dir: str | Path) -> "ChatTemplate":
        """The plan's template, else ChatML with one warning."""
        config = load_tokenizer_config(plan_dir)
        if config is None or not config.chat_template:
            why = f"{TOKENIZER_CONFIG_FILE} is missing (compiled before plans carried one)" if config is None \
                else "the model has no chat template"
            _warn_once(f"{plan_dir}: {why}; using ChatML for chat prompts")
            config = config or TokenizerConfig()
        return cls(config)

    @property
    def is_fallback(self) -> bool:
        return not self.config.chat_template

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ({"role", "content"} dicts); ValueError if the template refuses them."""
        import jinja2

        specials = {k: getattr(self.config, k) for k in SPECIAL_TOKENS if getattr(self.config, k) is not None}
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **specials)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:  # messages the template cannot handle
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise PlanError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
