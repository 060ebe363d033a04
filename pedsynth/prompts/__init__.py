"""Every prompt and the caption template bank, as plain files versioned by content hash.

A prompt's hash is the first 16 hex characters of the SHA-256 of its text; it is written into
every row the prompt produced (``prompt_hash``) and into each stage's fingerprint, so editing a
prompt file re-runs exactly the stages that use it. Placeholders use ``str.format`` fields
(``{caption}``, ``{template}``, ``{edit}``); :meth:`Prompt.render` refuses missing or extra ones.
"""

from __future__ import annotations

import functools
import hashlib
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

PROMPT_NAMES = ("caption_static", "caption_template", "caption_common", "rewrite", "reannotate")
SLOT_LEAK_MARKERS = ("description]", "[", "]", "<")


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def hash(self) -> str:
        return content_hash(self.text)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

    def render(self, **values: str) -> str:
        """The prompt with its placeholders filled; a missing or unknown one is an error."""
        if set(values) != self.fields:
            raise KeyError(
                f"prompt {self.name!r} takes {sorted(self.fields)}, got {sorted(values)}"
            )
        return self.text.format(**values)


@dataclass(frozen=True)
class Template:
    id: str
    text: str


@dataclass(frozen=True)
class TemplateBank:
    templates: tuple[Template, ...]
    hash: str

    def __len__(self) -> int:
        return len(self.templates)

    def by_id(self, template_id: str) -> Template:
        for t in self.templates:
            if t.id == template_id:
                return t
        raise KeyError(f"no template {template_id!r}")


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def load_prompt(name: str) -> Prompt:
    """One prompt file (``pedsynth/prompts/NAME.txt``), trailing whitespace stripped."""
    if name not in PROMPT_NAMES:
        raise KeyError(f"no prompt {name!r}; known: {', '.join(PROMPT_NAMES)}")
    return Prompt(name, _read(f"{name}.txt").strip())


def load_templates(path: str | Path | None = None) -> TemplateBank:
    """A template bank: the packaged one (``templates.yaml``), or the file at ``path`` in the
    same format (``pedsynth learn-templates`` writes one). Ids must be unique and every
    template must have a ``[slot]``; a file that is missing, empty or malformed is refused with a
    one-line :class:`~pedsynth.schemas.config.ConfigError` naming it. The bank's ``hash`` is
    the file's content hash."""
    if path is None:
        return _parse_bank(_read("templates.yaml"), "templates.yaml")
    from pedsynth.schemas.config import ConfigError

    try:
        raw = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"template file {path}: cannot read it ({exc})") from None
    try:
        return _parse_bank(raw, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@functools.cache
def _parse_bank(raw: str, name: str) -> TemplateBank:
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"template file {name}: not valid YAML{line}") from None
    entries = data.get("templates") if isinstance(data, dict) else None
    if not entries or not isinstance(entries, list):
        raise ValueError(f"template file {name}: no `templates:` list")
    templates = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("id") or not isinstance(e.get("text"), str):
            raise ValueError(f"template file {name}: entry {i} needs an `id` and a `text`")
        templates.append(Template(str(e["id"]), e["text"].strip()))
    ids = [t.id for t in templates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"template file {name}: duplicate template ids")
    for t in templates:
        if "[" not in t.text:
            raise ValueError(f"template file {name}: template {t.id} has no [slot]")
    return TemplateBank(tuple(templates), content_hash(raw))
