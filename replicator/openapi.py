"""The OpenAPI 3.0 document of the HTTP endpoint (served at ``/v1/openapi.json``).

Written by hand next to the handlers in :mod:`replicator.server`; a test checks that every
route the server registers is described here and that nothing described is missing.
"""

from __future__ import annotations

from typing import Any

import replicator

_JSON = "application/json"


def _ok(description: str, schema: dict[str, Any] | None = None,
        content: str = _JSON) -> dict[str, Any]:
    return {"description": description,
            "content": {content: {"schema": schema or {"type": "object"}}}}


_ERROR = {"type": "object", "properties": {"error": {"type": "string"}},
          "required": ["error"]}
_UNAVAILABLE = {"description": "The store could not be read",
                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
_UNAUTHORIZED = {"description": "Missing or wrong bearer token (nothing else is said)",
                 "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}

_JOB = {
    "type": "object",
    "required": ["id", "state", "request", "created"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
        "request": {"type": "object"},
        "created": {"type": "string", "format": "date-time"},
        "started": {"type": "string", "format": "date-time", "nullable": True},
        "finished": {"type": "string", "format": "date-time", "nullable": True},
        "exit_code": {"type": "integer", "nullable": True,
                      "description": "exit code of `replicator restore` (0 ok, 7 not "
                                     "restorable, 4 corrupt, 8 target, 9 digest mismatch)"},
        "result": {"type": "object", "nullable": True,
                   "description": "the restore's JSON report (digests, counts, cut)"},
        "error": {"type": "string", "nullable": True},
    },
}

_RESTORE_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "at": {"type": "string", "description": "RFC 3339 time, relative (-15m) or latest"},
        "offsets": {"type": "string", "description": "topic:partition:end_offset,..."},
        "target": {"type": "string",
                   "description": "postgresql://, kafka://, or sqlite:// / jsonl:// inside "
                                  "<data_dir>/restores (default: a new SQLite file there)"},
        "entities": {"type": "array", "items": {"type": "string"}},
        "keys": {"type": "array", "items": {"type": "string"}},
        "replace": {"type": "boolean", "default": False},
        "swap_into": {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,62}$"},
    },
}


def document() -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"bearer": []}]

    def op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"summary": summary, "security": secured,
                "responses": {**responses, "401": _UNAUTHORIZED}, **extra}

    return {
        "openapi": "3.0.3",
        "info": {"title": "replicator admin API", "version": replicator.__version__,
                 "description": "Health, metrics, status, backups and restore jobs of one "
                                "replicator instance. Everything except /healthz and "
                                "/readyz needs `Authorization: Bearer <token>`."},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR, "RestoreJob": _JOB,
                        "RestoreRequest": _RESTORE_REQUEST},
        },
        "paths": {
            "/healthz": {"get": {
                "summary": "Alive and the spool has not failed", "security": [],
                "responses": {"200": _ok("healthy"), "503": _ok("failing")}}},
            "/readyz": {"get": {
                "summary": "Consuming and durable (partitions assigned)", "security": [],
                "responses": {"200": _ok("ready"), "503": _ok("not ready")}}},
            "/metrics": {"get": op("Prometheus metrics", {
                "200": _ok("text exposition format", {"type": "string"}, "text/plain")})},
            "/v1/openapi.json": {"get": op("This document", {"200": _ok("OpenAPI 3.0")})},
            "/v1/status": {"get": op(
                "Lag, durable offsets, RPO now, restorable window, snapshots, quarantine, "
                "store health, objectives (same document as `replicator status --json`)",
                {"200": _ok("status"),
                 "503": _UNAVAILABLE})},
            "/v1/backups": {"get": op(
                "Restorable window per entity and the snapshot chain (same document as "
                "`replicator backups list --json`)",
                {"200": _ok("backups"),
                 "503": _UNAVAILABLE})},
            "/v1/destinations": {"get": op("Each further destination's live state",
                                           {"200": _ok("destinations")})},
            "/v1/restores": {"post": op(
                "Start a restore job (runs `replicator restore` as a child process)",
                {"202": _ok("queued", {"$ref": "#/components/schemas/RestoreJob"}),
                 "400": _ok("bad request", {"$ref": "#/components/schemas/Error"})},
                requestBody={"required": True, "content": {_JSON: {
                    "schema": {"$ref": "#/components/schemas/RestoreRequest"}}}})},
            "/v1/restores/{id}": {"get": op(
                "A restore job's state and, when finished, its report",
                {"200": _ok("the job", {"$ref": "#/components/schemas/RestoreJob"}),
                 "404": _ok("no such job", {"$ref": "#/components/schemas/Error"})},
                parameters=[{"name": "id", "in": "path", "required": True,
                             "schema": {"type": "string"}}])},
            "/v1/tail": {"get": op(
                "Live tail for followers: durable blocks of the requested partitions "
                "(docs/FORMAT.md §8)",
                {"200": _ok("frames", {"type": "string", "format": "binary"},
                            "application/octet-stream"),
                 "400": _ok("bad parameters", {"type": "string"}, "text/plain")},
                parameters=[
                    {"name": "p", "in": "query", "required": True, "style": "form",
                     "explode": True, "schema": {"type": "array", "items": {"type": "string"}},
                     "description": "topic:partition:from_offset (repeatable)"},
                    {"name": "wait_ms", "in": "query", "schema": {"type": "integer"}},
                    {"name": "head", "in": "query", "schema": {"type": "integer"}}])},
        },
    }
