"""Keeps the run's samples in results/raw.json, rewritten after every measurement so a crash keeps what ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RAW = RESULTS / "raw.json"


class Store:
    """Run metadata plus, per scenario, its description and the list of samples."""

    def __init__(self, path: Path = RAW, meta: dict | None = None) -> None:
        self.path = path
        self.data: dict = {"meta": meta or {}, "scenarios": {}}
        self._save()

    def describe(self, scenario: str, **description: object) -> None:
        entry = self.data["scenarios"].setdefault(scenario, {"samples": []})
        entry.update(description)
        self._save()

    def add(self, scenario: str, sample: dict) -> None:
        self.data["scenarios"].setdefault(scenario, {"samples": []})["samples"].append(sample)
        self._save()

    def samples(self, scenario: str) -> list[dict]:
        return self.data["scenarios"].get(scenario, {}).get("samples", [])

    def update_meta(self, **values: object) -> None:
        self.data["meta"].update(values)
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.data, indent=1))
        os.replace(partial, self.path)  # readers never see half a file


def load(path: Path = RAW) -> dict:
    return json.loads(path.read_text())
