"""Read Kubernetes YAML from files and folders, keeping where each document came from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tierwise.api.resources import AnyResource, Namespace, Problem, object_ref, parse_objects

Doc = tuple[Mapping[str, Any], str]


def yaml_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _documents(path: Path, text: str | None = None) -> Iterator[Doc | Problem]:
    try:
        docs = list(yaml.safe_load_all(path.read_text() if text is None else text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        yield Problem(where, "", f"not valid YAML: {getattr(e, 'problem', None) or e}")
        return
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        source = f"{path}#{i + 1}" if len(docs) > 1 else str(path)
        if not isinstance(doc, dict):
            yield Problem(source, "", "a document must be a Kubernetes object (a mapping)")
        elif doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from ((item, source) for item in doc["items"] if isinstance(item, dict))
        else:
            yield doc, source


@dataclass
class Loaded:
    """What a folder holds: resources, Namespaces (for labels), problems, and where each object is."""

    resources: list[AnyResource] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def locate(self, problems: list[Problem]) -> list[Problem]:
        """The problems, each naming the file (and document) of its object where known."""
        return [p if p.source else replace(p, source=self.sources.get(p.obj, "")) for p in problems]


def load(path: Path, stdin: str | None = None) -> Loaded:
    """Every tierwise resource and Namespace under `path` (or in `stdin` text, when given), and
    every problem reading them."""
    if stdin is None and not path.exists():
        return Loaded(problems=[Problem(str(path), "", "no such file or directory")])
    docs: list[Doc] = []
    out = Loaded()
    for f in [path] if stdin is not None else yaml_files(path):
        for item in _documents(f, stdin):
            if isinstance(item, Problem):
                out.problems.append(item)
            else:
                docs.append(item)
    out.resources, out.namespaces, parse_problems = parse_objects(docs)
    out.problems += parse_problems
    for doc, source in docs:
        meta = doc.get("metadata") or {}
        out.sources.setdefault(object_ref(doc.get("kind"), meta.get("namespace"), meta.get("name")), source)
    return out
