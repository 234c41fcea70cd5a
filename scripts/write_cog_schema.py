"""Write .cog/openapi_schema.json from the Cog runner in predict.py, as `cog build` would.

The Cog HTTP server validates prediction inputs against this file (it reads it from its
working directory and uses `components.schemas.Input`); without it nothing is validated.
`cog build` writes it into the image from a static parse of predict.py; this script builds
the same document from the runner's inputs as the installed cog package inspects them,
laid out as Cog's generator lays it out (pkg/schema/openapi_spec.go: choices become an
enum component referenced through `allOf`, `Optional[...]` becomes `nullable`, every
property carries `x-order`, compact JSON with map keys sorted). `cog build` overwrites the
file with its own rendering, which should differ at most in `info.version` (the CLI's), so
`--check` (and the tests) compare everything else.

Usage: .venv/bin/python scripts/write_cog_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"
RUNNER = ("predict", "Runner")  # cog.yaml: run: "predict.py:Runner"


def _title(name: str) -> str:
    """Cog's TitleCase: split on "_", capitalize each part's first letter, join with spaces."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # Go prints float64 1.0 as 1


def _sorted(value: Any) -> Any:
    """Go's encoding/json sorts the keys of every map; only Cog's ordered maps keep their order."""
    if isinstance(value, _Ordered):
        return {k: _sorted(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


class _Ordered(dict):
    """A map whose insertion order is kept (Cog's orderedMapAny)."""


def input_schema(inputs: dict) -> tuple[dict, list[tuple[str, dict]]]:
    from cog import _adt as adt

    properties = _Ordered()
    required: list[str] = []
    enums: list[tuple[str, dict]] = []
    for name, field in inputs.items():
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices:
            json_type = field.type.primitive.json_type().get("type") or "string"
            enums.append(
                (name, {"title": name, "description": "An enumeration.", "enum": list(field.choices), "type": json_type})
            )
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(field.type.json_type())
        nullable = field.type.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
        if field.default is not None:
            prop["default"] = field.type.json_encode(field.default)
        elif nullable:
            # Cog writes `"default": null` for `Optional[T] = Input(default=None)` (the only
            # way this runner declares an optional input; the inspector cannot tell it from
            # an Optional input without any default, which Cog would leave default-less).
            prop["default"] = None
        elif field.type.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED):
            required.append(name)
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def build_schema() -> dict:
    """The OpenAPI 3.0.2 document for the runner (imports predict.py, loads no weights)."""
    import cog
    from cog import _inspector

    sys.path.insert(0, str(ROOT))
    info = _inspector.create_predictor(*RUNNER)
    inputs, enums = input_schema(info.inputs)
    validation_error = {"$ref": "#/components/schemas/HTTPValidationError"}
    json_ok = {"application/json": {"schema": {}}}

    components = _Ordered()
    components["Input"] = inputs
    components["Output"] = info.output.json_type()
    for name, enum in enums:
        components[name] = enum
    components["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": "#/components/schemas/Input"}},
    }
    components["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
            "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }

    paths = _Ordered()
    paths["/"] = {
        "get": {"summary": "Root", "operationId": "root__get", "responses": {"200": {"description": "Successful Response", "content": json_ok}}}
    }
    paths["/health-check"] = {
        "get": {
            "summary": "Healthcheck",
            "operationId": "healthcheck_health_check_get",
            "responses": {"200": {"description": "Successful Response", "content": json_ok}},
        }
    }
    paths["/predictions"] = {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}},
                },
                "422": {"description": "Validation Error", "content": {"application/json": {"schema": validation_error}}},
            },
        }
    }
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {"required": True, "schema": {"title": "Prediction Id", "type": "string"}, "name": "prediction_id", "in": "path"}
            ],
            "responses": {
                "200": {"description": "Successful Response", "content": json_ok},
                "422": {"description": "Validation Error", "content": {"application/json": {"schema": validation_error}}},
            },
        }
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def render(schema: dict) -> str:
    """Compact JSON in Go's key order, no trailing newline: the bytes `cog build` writes."""
    return json.dumps(_sorted(schema), separators=(",", ":"), ensure_ascii=False)


def same_schema(committed: str, fresh: str) -> bool:
    """Whether two renderings describe the same schema: equal as JSON but for
    `info.version`, which `cog build` sets to its CLI's version."""

    def versionless(text: str) -> dict:
        schema = json.loads(text)
        schema.get("info", {}).pop("version", None)
        return schema

    return versionless(committed) == versionless(fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs, write nothing")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    text = render(build_schema())
    if args.check:
        if not (SCHEMA_PATH.exists() and same_schema(SCHEMA_PATH.read_text(), text)):
            print(f"{os.path.relpath(SCHEMA_PATH)} is out of date: run scripts/write_cog_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
