#!/usr/bin/env python3
"""Seconds per step of an `adapt` run's train_log.jsonl: the last line's time over its step
count, the first step left out (it maps and stages what later steps find ready).

    python3 benches/per_step.py OUT/train_log.jsonl
"""
import json
import sys

lines = [json.loads(l) for l in open(sys.argv[1])]
a, b = lines[0], lines[-1]
print((b["seconds"] - a["seconds"]) / max(1, b["step"] - a["step"]))
