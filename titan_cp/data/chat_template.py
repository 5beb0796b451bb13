"""Render a conversation with a Hugging Face chat template, the way transformers does.

transformers' `apply_chat_template` (v5) compiles the template in a Jinja2
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension and a `{% generation %}` block tag (it only marks assistant text; here it renders its
body unchanged). It adds `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter
that is plain `json.dumps` (no HTML escaping, `ensure_ascii=False`, with indent, separators and
sort_keys), a `dict` that can only build dicts, and a `namespace` that refuses underscore names.
The template sees `messages` (keys whose value is None removed; a message's reasoning under
`reasoning_content`, `thinking` or `reasoning` is given under `thinking` and
`reasoning_content` too), `tools=None`, `documents=None`, `add_generation_prompt` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ... and other `*_token` keys: those
its config sets).
The rendered text is then tokenized without adding special tokens.
"""

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateRejected(Exception):
    """The template called raise_exception, or failed while rendering this conversation."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _DictBuilder:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attribute names that start with '_' (no way into internals)."""

    def __init__(*args, **kwargs):  # no named `self`: `namespace(self=1)` must stay a valid call
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template; raises jinja2.TemplateSyntaxError for a template that does not parse."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(), namespace=_Namespace
    )
    return env.from_string(source)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the template sees them: no None values, reasoning under its usual names."""
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    template: jinja2.Template, messages: list[dict], special_tokens: dict[str, str], add_generation_prompt: bool = False
) -> str:
    """The conversation as text; raises TemplateRejected with the template's own message."""
    try:
        return template.render(
            **special_tokens,
            messages=template_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.exceptions.TemplateError as e:
        raise TemplateRejected(" ".join(str(e).split()) or type(e).__name__) from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise TemplateRejected(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
