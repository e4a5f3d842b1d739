"""The CRD YAML is generated from the models: no drift, structural, documented, with CEL rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tierwise.crdgen import all_crds, render

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", ["crds", "charts/tierwise/crds"])
def test_committed_crds_match_the_models(folder: str) -> None:
    for name, crd in all_crds().items():
        path = ROOT / folder / name
        assert path.exists(), f"{path} is missing; run python hack/gen_crds.py"
        assert path.read_text() == render(crd), f"{path} drifted from the models; run python hack/gen_crds.py"


def test_gen_crds_check_detects_drift(tmp_path: Path) -> None:
    target = ROOT / "crds" / "tierwise.dev_costbudgets.yaml"
    original = target.read_text()
    try:
        target.write_text(original.replace("Spend limit.", "Edited by hand."))
        res = subprocess.run(
            [sys.executable, str(ROOT / "hack" / "gen_crds.py"), "--check"], capture_output=True, text=True, check=False
        )
        assert res.returncode == 1
        assert "drift: crds/tierwise.dev_costbudgets.yaml" in res.stderr
    finally:
        target.write_text(original)


def _walk(node: dict[str, Any], path: str):  # type: ignore[no-untyped-def]
    yield path, node
    for k, v in node.get("properties", {}).items():
        yield from _walk(v, f"{path}.{k}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_schema_is_structural_and_every_field_documented(name: str) -> None:
    crd = all_crds()[name]
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root, ""):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        is_item = path.endswith("[]") or path.endswith("{}")
        if path.count(".") >= 2 and not is_item and not path.startswith(".metadata"):
            assert node.get("description"), f"{name}: {path} has no description"


def test_invariants_become_cel_rules() -> None:
    tiers = all_crds()["tierwise.dev_inferencetiers.yaml"]
    text = yaml.safe_dump(tiers)
    assert "has(self.url) != has(self.deployment)" in text
    assert "self.spec.fallback.tier != self.metadata.name" in text
    root = tiers["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    replicas = root["properties"]["spec"]["properties"]["backends"]["items"]["properties"]["deployment"]["properties"][
        "replicas"
    ]
    assert replicas["x-kubernetes-validations"][0]["rule"] == "!has(self.min) || !has(self.max) || self.min <= self.max"
    assert replicas["x-kubernetes-validations"][0]["fieldPath"] == ".min"
