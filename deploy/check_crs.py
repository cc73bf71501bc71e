#!/usr/bin/env python3
"""Checks custom resources against the CRDs' own OpenAPI v3 schemas.

deploy/examples/mcs.yaml and policies.yaml must all pass; every object in
deploy/examples/mcs-invalid.yaml and policies-invalid.yaml must fail. Exits
non-zero otherwise.
"""
import sys

import jsonschema
import yaml


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def schemas(crd_files):
    out = {}
    for path in crd_files:
        for crd in load(path):
            spec = crd["spec"]
            for v in spec["versions"]:
                key = (f'{spec["group"]}/{v["name"]}', spec["names"]["kind"])
                out[key] = v["schema"]["openAPIV3Schema"]
    return out


def errors(obj, by_kind):
    schema = by_kind.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        return [f'no CRD for {obj["apiVersion"]} {obj["kind"]}']
    v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    return [f'{"/".join(map(str, e.path))}: {e.message}' for e in v.iter_errors(obj)]


def main():
    by_kind = schemas(["deploy/crds/multicluster.x-k8s.io.yaml", "deploy/crds/causeway.dev.yaml"])
    failed = False
    for path in ["deploy/examples/mcs.yaml", "deploy/examples/policies.yaml"]:
        for obj in load(path):
            errs = errors(obj, by_kind)
            if errs:
                failed = True
                print(f'{path}: {obj["kind"]} {obj["metadata"]["name"]}: {errs}')
    for path in ["deploy/examples/mcs-invalid.yaml", "deploy/examples/policies-invalid.yaml"]:
        for obj in load(path):
            if not errors(obj, by_kind):
                failed = True
                print(f'{path}: {obj["kind"]} {obj["metadata"]["name"]} was accepted but must be refused')
    print("custom resources vs CRD schemas:", "FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
