"""Versioned prompt templates (``*.txt`` next to this file, written in our own words).

File format::

    #! scale: 0 100          meta lines (``#! key: value``), optional
    ### system
    ...system message...
    ### user
    ...user message with $placeholders (string.Template syntax; $$ is a literal dollar)...

A template's version is ``<name>@<first 12 hex of sha256(file text)>``: editing a template changes its
version, hence the response-cache key and (through the stage config) the stage's output prefix, so no
stale reply is ever reused for a changed prompt. A config may name a built-in template or give a path to
a file of the same format.
"""

from __future__ import annotations

import functools
import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str
    meta: dict = field(default_factory=dict, hash=False)

    # The version and the parsed sections are computed once per template (a stage renders one prompt per
    # sample, hundreds per second): cached_property writes the instance __dict__, which a frozen
    # dataclass allows.
    @functools.cached_property
    def version(self) -> str:
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:12]}"

    @functools.cached_property
    def _compiled(self) -> list[tuple[str, string.Template]]:
        secs = self.sections()
        if "user" not in secs:
            raise ValueError(f"template {self.name}: no '### user' section")
        return [(role, string.Template(secs[role])) for role in ("system", "user") if role in secs]

    def sections(self) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        cur = None
        for line in self.text.splitlines():
            if line.startswith("#!"):
                continue
            if line.startswith("### "):
                cur = line[4:].strip().lower()
                out[cur] = []
            elif cur is not None:
                out[cur].append(line)
        return {k: "\n".join(v).strip("\n") for k, v in out.items()}

    def render(self, **values) -> list[dict]:
        """Chat messages (system, if any, then user) with ``values`` substituted (all must be given)."""
        return [{"role": role, "content": tpl.substitute(values)} for role, tpl in self._compiled]

    def placeholders(self) -> set[str]:
        ids = set()
        for sec in self.sections().values():
            for m in string.Template.pattern.finditer(sec):
                name = m.group("named") or m.group("braced")
                if name:
                    ids.add(name)
        return ids


def _meta(text: str) -> dict:
    meta = {}
    for line in text.splitlines():
        if line.startswith("#!") and ":" in line:
            k, _, v = line[2:].partition(":")
            meta[k.strip()] = v.strip()
    return meta


def builtin_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.txt"))


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name (``caption_quality_100``) or a template file by path."""
    p = Path(name_or_path)
    if p.suffix == ".txt" and p.exists():
        text = p.read_text(encoding="utf-8")
        return PromptTemplate(p.stem, text, _meta(text))
    builtin = HERE / f"{name_or_path}.txt"
    if not builtin.exists():
        raise ValueError(f"unknown prompt template {name_or_path!r}; built-in: {builtin_names()}")
    text = builtin.read_text(encoding="utf-8")
    return PromptTemplate(name_or_path, text, _meta(text))


def pinned_template(name_or_path: str, pinned: str) -> PromptTemplate:
    """:func:`load_template`, checked against a recipe's pinned ``prompt_version`` (empty: not pinned).

    A config stores the returned template's ``version`` in its ``prompt_version`` field, so the config hash
    changes whenever the template text does."""
    tpl = load_template(name_or_path)
    if pinned and pinned != tpl.version:
        raise ValueError(f"prompt_version {pinned!r} pinned, but the template is {tpl.version!r}")
    return tpl


def pinned_versions(names, pinned) -> tuple[str, ...]:
    """The versions of several templates, checked against a recipe's pinned ``prompt_versions`` (empty:
    not pinned); the plural of :func:`pinned_template`."""
    versions = tuple(load_template(n).version for n in names)
    if pinned and tuple(pinned) != versions:
        raise ValueError(f"prompt_versions {list(pinned)} pinned, templates are {list(versions)}")
    return versions
