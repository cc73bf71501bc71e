#!/usr/bin/env python3
"""Checks that `helm template` of the chart equals `causeway install` for
the same site: the same objects (by kind, namespace and name) with the same
content. The chart leaves out the Namespace object (Helm installs into an
existing one, or --create-namespace)."""
import sys

import yaml


def objects(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] != "Namespace"
    }


def main():
    helm, install = objects(sys.argv[1]), objects(sys.argv[2])
    problems = []
    for key in sorted(set(helm) | set(install)):
        if key not in helm:
            problems.append(f"{key}: in causeway install, not in the chart")
        elif key not in install:
            problems.append(f"{key}: in the chart, not in causeway install")
        elif helm[key] != install[key]:
            problems.append(f"{key}: differs\n  chart:   {helm[key]}\n  install: {install[key]}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"{sys.argv[1]}: the chart renders what causeway install does ({len(helm)} objects)")


if __name__ == "__main__":
    main()
