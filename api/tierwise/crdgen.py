"""Generate CustomResourceDefinitions from the pydantic models (the models are the source of truth).

pydantic emits JSON Schema with `$ref`s, `anyOf` for optional fields and titles; a CRD needs a
*structural* OpenAPI v3 schema: every node typed, no references, no `anyOf` of different types.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tierwise.api.common import GROUP, VERSION, ApiModel
from tierwise.api.resources import KINDS, Resource

Schema = dict[str, Any]

_KEEP = {
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "default",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
}


def _models_by_title(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Map each nested model's schema title to its class, to find the invariants it declares."""
    seen: dict[str, type[BaseModel]] = {}
    stack: list[type[BaseModel]] = [model]
    while stack:
        m = stack.pop()
        if m.__name__ in seen:
            continue
        seen[m.__name__] = m
        for f in m.model_fields.values():
            for arg in _type_args(f.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    stack.append(arg)
    return seen


def _type_args(tp: Any) -> list[Any]:
    from typing import get_args

    args = get_args(tp)
    if not args:
        return [tp]
    out: list[Any] = []
    for a in args:
        out.extend(_type_args(a))
    return out


def _is_model_factory(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, BaseModel)


def _convert(node: Schema, defs: Schema, models: dict[str, type[BaseModel]]) -> Schema:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        merged["title"] = name
        return _convert(merged, defs, models)
    if "anyOf" in node:
        # Optional[X] is X with the field left out of `required`; a null is never stored.
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express union in a structural schema: {node}")
        merged = {**variants[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        if merged.get("default", 0) is None:
            del merged["default"]
        return _convert(merged, defs, models)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    out: Schema = {k: v for k, v in node.items() if k in _KEEP}
    # JSON Schema's numeric exclusive bounds are OpenAPI 3.0's boolean flags next to the bound.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[flag] = out[bound]
            out[bound] = True
    if "properties" in out:
        out["properties"] = {k: _convert(v, defs, models) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _convert(out["items"], defs, models)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(out["additionalProperties"], defs, models)
    elif out.get("additionalProperties") is False:
        del out["additionalProperties"]
    # Defaults are applied by the API server only for scalars: a defaulted object would freeze
    # today's nested defaults into every stored object.
    if isinstance(out.get("default"), dict | list):
        del out["default"]
    model = models.get(node.get("title", ""))
    if model is not None:
        # A sub-object whose every field has a default is stored as `{}` and filled in by the
        # server's own defaulting, so stored objects (and printer columns) show effective values.
        for name, f in model.model_fields.items():
            key = f.alias or name
            if key in out.get("properties", {}) and _is_model_factory(f.default_factory):
                out["properties"][key]["default"] = {}
    if model is not None and issubclass(model, ApiModel) and model.invariants:
        out["x-kubernetes-validations"] = [inv.cel() for inv in model.invariants]
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _section_schema(resource: type[Resource], field: str) -> Schema:
    model = resource.model_fields[field].annotation
    target = next(a for a in _type_args(model) if isinstance(a, type) and issubclass(a, BaseModel))
    raw = target.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert({**raw, "title": target.__name__}, defs, _models_by_title(target))


def crd_for(resource: type[Resource]) -> Schema:
    """The CustomResourceDefinition of one kind."""
    spec = _section_schema(resource, "spec")
    status = _section_schema(resource, "status")
    root: Schema = {
        "type": "object",
        "description": resource.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            # metadata.name is declared so that a rule on it can name it as its fieldPath (a CRD
            # may describe nothing else of metadata).
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec,
            "status": status,
        },
    }
    if resource.root_invariants:
        root["x-kubernetes-validations"] = [inv.cel() for inv in resource.root_invariants]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "tierwise"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind_name,
                "listKind": f"{resource.kind_name}List",
                "plural": resource.plural,
                "singular": resource.kind_name.lower(),
                "shortNames": list(resource.short_names),
                "categories": ["tierwise"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.crd() for c in resource.columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def all_crds() -> dict[str, Schema]:
    """File name → CRD for every kind, in a stable order."""
    return {f"{GROUP}_{k.plural}.yaml": crd_for(k) for k in KINDS.values()}


def render(crd: Schema) -> str:
    import yaml

    header = "# Generated by hack/gen_crds.py from the pydantic models in api/tierwise/api. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=100)
