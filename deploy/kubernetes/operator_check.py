#!/usr/bin/env python3
"""Checks the two Prometheus Operator resources of deploy/kubernetes
(ServiceMonitor, PrometheusRule) against the fields and types the
operator's CRDs give them, strictly: kubernetes-validate knows only the
built-in kinds. Needs PyYAML and jsonschema (both come with
kubernetes-validate in the validators' venv).

  python3 deploy/kubernetes/operator_check.py FILE...
"""

import sys

import jsonschema
import yaml

DURATION = {"type": "string", "pattern": r"^(([0-9]+)(ms|s|m|h|d|w|y))+$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": LABELS, "annotations": LABELS},
}


def resource(kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
    }


SCHEMAS = {
    "ServiceMonitor": resource("ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": LABELS}},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                    },
                },
            },
        },
    }),
    "PrometheusRule": resource("PrometheusRule", {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "additionalProperties": False,
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"type": "string", "minLength": 1},
                                    "for": DURATION,
                                    "labels": LABELS,
                                    "annotations": LABELS,
                                },
                            },
                        },
                    },
                },
            },
        },
    }),
}


def main(paths):
    failed = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                kind = doc.get("kind")
                try:
                    jsonschema.validate(doc, SCHEMAS[kind])
                    print(f"INFO {path} passed for {kind.lower()}/{doc['metadata']['name']} against the operator's fields")
                except KeyError:
                    print(f"ERROR {path}: no schema for kind {kind}")
                    failed += 1
                except jsonschema.ValidationError as e:
                    print(f"ERROR {path}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
                    failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
