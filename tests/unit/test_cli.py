"""`tierwise` as a user runs it: compile's output, exact error messages, exit codes; the operator's commands
where their dependencies are not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cases import budget, tier
from tierwise_cli.main import OPERATOR_MISSING, main

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tierwise", path=str(Path(sys.executable).parent)) or "tierwise"
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def write(folder: Path, name: str, *docs: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump_all(docs))


def test_compile_quickstart_prints_the_policy() -> None:
    res = run("compile", str(ROOT / "examples" / "quickstart"))
    assert res.returncode == 0, res.stderr
    policy = yaml.safe_load(res.stdout)
    assert policy["kind"] == "Policy" and policy["namespace"] == "default"
    assert policy["tiers"]["gold"]["fallbackChain"] == ["silver", "bronze"]
    assert policy["tiers"]["silver"]["spec"]["routing"]["strategy"] == "CostAware"


def test_compile_platform_example_gives_one_policy_per_namespace() -> None:
    res = run("compile", str(ROOT / "examples" / "platform"), "-o", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kind"] == "List"
    assert {p["namespace"]: sorted(p["tiers"]) for p in out["items"]} == {
        "team-a": ["shared-economy", "team-a-premium"],
        "team-b": ["shared-economy"],
    }


def test_compile_single_namespace(tmp_path: Path) -> None:
    res = run("compile", str(ROOT / "examples" / "platform"), "--namespace", "team-b", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["defaultTier"] == "shared-economy"


def test_cycle_and_unknown_tier_exact_messages(tmp_path: Path) -> None:
    write(
        tmp_path,
        "tiers.yaml",
        tier("gold", fallback={"tier": "silver"}),
        tier("silver", fallback={"tier": "gold"}),
        tier("bronze", fallback={"tier": "tin"}),
    )
    write(tmp_path / "budgets", "b.yaml", budget(selector={"tiers": ["platinum"]}))
    res = run("compile", str(tmp_path))
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f'error: InferenceTier default/bronze ({tmp_path}/tiers.yaml#3): spec.fallback.tier: tier "tin" does not exist '
        "in namespace default",
        f'error: CostBudget default/monthly ({tmp_path}/budgets/b.yaml): spec.selector.tiers[0]: tier "platinum" does '
        "not exist in namespace default",
        f"error: InferenceTier default/gold ({tmp_path}/tiers.yaml#1): spec.fallback.tier: fallback cycle: "
        "gold -> silver -> gold",
        "3 problem(s); nothing compiled",
    ]


def test_invalid_object_and_bad_yaml(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", tier("gold", priority=5000))
    (tmp_path / "b.yaml").write_text("kind: InferenceTier\nmetadata: {name: x\n")
    res = run("compile", str(tmp_path))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0].startswith(f"error: {tmp_path}/b.yaml:")
    assert "not valid YAML" in lines[0]
    assert lines[1] == (
        f"error: InferenceTier default/gold ({tmp_path}/a.yaml): spec.priority: "
        "Input should be less than or equal to 1000"
    )


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    res = run("compile", str(tmp_path))
    assert res.returncode == 1 and "no tierwise resources found" in res.stderr
    res = run("compile", str(tmp_path / "nope"))
    assert res.returncode == 1 and "no such file or directory" in res.stderr


def test_compile_reads_a_kubectl_list_from_stdin() -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [tier("gold", fallback={"tier": "silver"}), tier("silver")]}
    res = run("compile", "-", "-o", "json", stdin=yaml.safe_dump(listing))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tiers"]["gold"]["fallbackChain"] == ["silver"]


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Import `modules` as if they were not installed; the operator's commands are imported afresh."""
    import tierwise_operator

    for name in ("run", "webhook"):
        monkeypatch.delattr(tierwise_operator, name, raising=False)
        monkeypatch.delitem(sys.modules, f"tierwise_operator.{name}", raising=False)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_operator_commands_without_their_dependencies_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "kopf")
    for args in (["operator"], ["operator", "--help"], ["webhook", "--port", "9443"]):
        assert main(args) == 2
        out = capsys.readouterr()
        assert (out.out, out.err) == ("", f"error: {OPERATOR_MISSING}\n")
    # Other commands still refuse arguments they do not know.
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "x", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_missing_module_of_tierwise_itself_is_not_taken_for_a_missing_dependency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "tierwise_operator.health")
    # Its help needs nothing of the operator; running it imports the operator, and fails loudly.
    for command in ("operator", "webhook"):
        with pytest.raises(ModuleNotFoundError, match=r"tierwise_operator\.health"):
            main([command])
