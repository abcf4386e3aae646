"""Griffe extension: read Hugging Face-style docstrings with griffe's Google parser.

The package's docstrings follow the conventions of transformers and TRL, which the Google parser mostly accepts.
Two of them it does not, and this extension rewrites them before parsing (the source is not changed):

- `> Parameters that control ...` lines, which group a config's fields under a sub-heading inside `Parameters:`.
  The Google parser would read them as malformed parameters; they are dropped (the fields keep their order).
- Argument types written as `` name (`type`, *optional*, defaults to `value`): ``. The type column shows them as
  code, backticks included, so the backticks are taken out, and `*optional*` too (the default column says it):
  `` name (type, defaults to value): ``.
- `` [`Name`] `` and `` [`~module.Name`] `` cross-references of HF's doc builder, which Markdown would show with
  their brackets. They become inline code (`` `Name` ``; the `~` form keeps the last component, as HF renders it).

Everything else the parser reports (an unknown parameter, a malformed section) still reaches the log, so
`mkdocs build --strict` fails on it.
"""

import re

import griffe


_GROUP_HEADING = re.compile(r"^[ \t]*> Parameters that control\b.*\n(?:[ \t]*\n)?", re.MULTILINE)
# `[`name`]` not followed by a link target: `(url)` or `[id]`
_HF_XREF = re.compile(r"\[`(~?)([\w.]+)`\](?![(\[])")
# an argument line of a Parameters/Args/Attributes section: `name (type):`, the type holding backticks
_HF_ARG = re.compile(r"^([ \t]+\*{0,2}\w+ \()(.*`.*)(\):.*)$", re.MULTILINE)
_ARG_OPTIONAL = re.compile(r",\s*\*optional\*")


def _arg_type(match: re.Match) -> str:
    kind = _ARG_OPTIONAL.sub("", match.group(2))
    kind = _HF_XREF.sub(_xref, kind).replace("`", "")
    return f"{match.group(1)}{kind}{match.group(3)}"


def _xref(match: re.Match) -> str:
    name = match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


def rewrite(text: str) -> str:
    text = _GROUP_HEADING.sub("", text)
    text = _HF_ARG.sub(_arg_type, text)
    return _HF_XREF.sub(_xref, text)


class HFDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
