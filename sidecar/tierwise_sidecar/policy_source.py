"""Where the sidecar's Policy comes from, and how a change is picked up.

`tierwise sidecar` reads a compiled Policy file (the operator's ConfigMap, mounted read-only; the
kubelet swaps it through a symlink, so the file's identity is checked, not an inotify event).
`tierwise gateway` compiles a folder of CR YAML itself. Either way a change is loaded whole, checked
whole, and only then swapped in; anything wrong keeps the Policy in force.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE, build_world, check, compile_world
from tierwise.loader import load, yaml_files
from tierwise.policy import Policy
from tierwise_sidecar.endpoints import load_endpoints


class PolicyLoadError(Exception):
    """The new Policy is refused; the message says why (and names files and fields)."""


@dataclass(frozen=True)
class Loaded:
    policy: Policy
    endpoints: dict[str, tuple[str, ...]] | None


def _stat(path: Path) -> tuple[str, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def read_policy(path: Path) -> Policy:
    """A compiled Policy (YAML or JSON), whose content must match its hash when it has one."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PolicyLoadError(f"{path}: cannot read: {e}") from None
    except RecursionError:
        raise PolicyLoadError(f"{path}: nested too deeply to be a Policy") from None
    return policy_of(data, str(path))


def policy_of(data: object, where: str) -> Policy:
    """A compiled Policy from a parsed document: the Policy itself or the ConfigMap holding it
    (as `kubectl get configmap tierwise-policy -o yaml` prints it)."""
    if isinstance(data, dict) and data.get("kind") == "ConfigMap":
        raw = (data.get("data") or {}).get("policy.json") or (data.get("data") or {}).get("policy.yaml")
        try:
            data = yaml.safe_load(raw) if isinstance(raw, str) else None
        except yaml.YAMLError as e:
            raise PolicyLoadError(f"{where}: the ConfigMap's policy.json: cannot read: {e}") from None
        except RecursionError:
            raise PolicyLoadError(f"{where}: the ConfigMap's policy.json: nested too deeply") from None
    if not isinstance(data, dict):
        raise PolicyLoadError(f"{where}: not a Policy document")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise PolicyLoadError(f"{where}: {loc}: {first['msg']} ({e.error_count()} problem(s))") from None
    if policy.hash and policy.sealed().hash != policy.hash:
        raise PolicyLoadError(f"{where}: content does not match its hash {policy.hash} (partly written or edited?)")
    return policy.sealed()


class PolicyFile:
    """A compiled Policy, as the operator writes it; with `namespace`, only one compiled for that
    namespace is accepted (a Policy of another namespace would label and route as that one)."""

    def __init__(self, path: Path, namespace: str | None = None) -> None:
        self.path = path
        self.namespace = namespace

    def signature(self) -> object:
        return _stat(self.path)

    def load(self) -> Loaded:
        policy = read_policy(self.path)
        if self.namespace is not None and policy.namespace != self.namespace:
            raise PolicyLoadError(
                f"{self.path}: the Policy is namespace {policy.namespace}'s, this sidecar serves {self.namespace}"
            )
        return Loaded(policy, None)


class CrFolder:
    """A folder of InferenceTier/CostBudget/CachePolicy YAML, compiled for one namespace, with an
    optional endpoints file for self-hosted backends."""

    def __init__(
        self,
        path: Path,
        namespace: str | None,
        platform_namespace: str = DEFAULT_PLATFORM_NAMESPACE,
        endpoints: Path | None = None,
    ) -> None:
        self.path = path
        self.namespace = namespace
        self.platform_namespace = platform_namespace
        self.endpoints = endpoints

    def _files(self) -> Sequence[Path]:
        files = list(yaml_files(self.path)) if self.path.exists() else []
        return [*files, self.endpoints] if self.endpoints else files

    def signature(self) -> object:
        return tuple(_stat(p) for p in self._files())

    def load(self) -> Loaded:
        if not self.path.exists():
            raise PolicyLoadError(f"{self.path} does not exist")
        found = load(self.path)
        world = build_world(found.resources, found.namespaces, self.platform_namespace)
        problems = found.problems + found.locate(check(world, found.resources))
        if problems:
            raise PolicyLoadError("; ".join(str(p) for p in problems))
        namespaces = sorted({r.namespace for r in found.resources} - {self.platform_namespace})
        namespace = self.namespace or (namespaces[0] if len(namespaces) == 1 else None)
        if namespace is None:
            raise PolicyLoadError(f"{self.path} spans namespaces {', '.join(namespaces) or '(none)'}: pass --namespace")
        policy = compile_world(world, namespace)
        if not policy.tiers:
            raise PolicyLoadError(f"{self.path}: no InferenceTier is usable from namespace {namespace}")
        endpoints = None
        if self.endpoints is not None:
            try:
                endpoints = load_endpoints(self.endpoints)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise PolicyLoadError(f"endpoints file: {e}") from None
        return Loaded(policy, endpoints)
