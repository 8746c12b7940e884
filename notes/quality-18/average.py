"""Averages `bench quality --json` files over seeds and subjects: per subject and configuration the mean of each
seed's value (files of one subject with other seeds are pooled), then the mean over subjects, and SID ÷ Case 1.

usage: python notes/quality-18/average.py FILE.json [FILE.json ...]
"""
import json
import sys
from collections import defaultdict

METRICS = ("nearby_object_leakage", "background_leakage", "text_alignment", "subject_fidelity")

values = defaultdict(list)  # (subject, config kind, metric) -> per-seed values
for path in sys.argv[1:]:
    data = json.load(open(path))
    subjects = [s.rstrip("/").split("/")[-1] for s in data["reference_sets"]]
    for row in data["rows"]:
        kind = row["captions"] + "+" + "+".join(row["regularizers"])
        for metric in METRICS:
            values[(subjects[0], kind, metric)] += row["metrics"][metric]["per_seed"]

subjects = sorted({key[0] for key in values})
kinds = sorted({key[1] for key in values})
for metric in METRICS:
    print(f"\n{metric}")
    means = {}
    for subject in subjects:
        cells = []
        for kind in kinds:
            seeds = values.get((subject, kind, metric), [])
            means[(subject, kind)] = sum(seeds) / len(seeds) if seeds else float("nan")
            cells.append(f"{kind} {means[(subject, kind)]:.4f} ({len(seeds)} seeds)")
        print(f"  {subject:13s} " + "  ".join(cells))
    overall = {kind: sum(means[(s, kind)] for s in subjects) / len(subjects) for kind in kinds}
    print("  mean over subjects: " + "  ".join(f"{kind} {value:.4f}" for kind, value in overall.items()))
    if len(kinds) == 2:
        case1, sid = (k for k in kinds if k.startswith("case1")), (k for k in kinds if k.startswith("sid"))
        case1, sid = next(case1), next(sid)
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "n/a (0 / 0)" if not a else "inf"  # noqa: E731
        print(f"  sid ÷ case1: {ratio(overall[sid], overall[case1])}  per subject: "
              + " ".join(f"{s} {ratio(means[(s, sid)], means[(s, case1)])}" for s in subjects))
