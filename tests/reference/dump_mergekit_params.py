#!/usr/bin/env python3
"""mergekit 0.1.5's parameter definitions, for tests/methods.rs's registry check.

For every registered merge method, each parameter with its scope (mergekit's `shared` is
symerge's global; `input` and `non_base` are per model), whether it is required, and its
default when it has one. Writes tests/fixtures/mergekit_params.json (sorted, so a regeneration
that changes nothing leaves the file as it is).

    target/venv-mergekit/bin/python tests/reference/dump_mergekit_params.py \
        [--out tests/fixtures/mergekit_params.json]
"""

import argparse
import json
import pathlib

import mergekit
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import ParameterScope


def dump():
    methods = {}
    for method in registered_methods():
        params = {}
        for p in method.spec.parameters:
            entry = {
                "scope": "global" if p.scope == ParameterScope.SHARED else "per_model",
                "required": p.required,
            }
            if not p.required:
                entry["default"] = p.default
            params[p.name] = entry
        methods[method.spec.name] = params
    return methods


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/mergekit_params.json")
    args = ap.parse_args()
    table = {"mergekit_version": getattr(mergekit, "__version__", "0.1.5"), "methods": dump()}
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
