"""Re-measures a `bench quality --report` HTML (its first seed's images) with today's measures: per configuration,
the README's nearby leakage (every pixel of the nearby object's colour) beside nearby_object_leakage (object-sized
regions only, services/evaluate/toyworld.py). For runs made before that measure counted regions (§11).

usage: python notes/quality-18/blobs.py REPORT.html REFERENCE_SET_FOLDER
"""
import base64
import io
import re
import sys
from collections import defaultdict

import numpy as np
from PIL import Image

from persona.services.evaluate import toyworld as tw


def main(report: str, folder: str) -> None:
    reference = tw.read_reference_set(folder)
    scores = defaultdict(list)
    # The report: one <section> per prompt, in it one <div class="concept"><h4>CONFIG</h4> grid per configuration.
    for name, grid in re.findall(r'<div class="concept"><h4>([^<]*)</h4>(.*?)</div>', open(report).read()):
        for tag in re.findall(r'<img[^>]*>', grid):
            if "next to a small" in re.search(r'alt="([^"]*)"', tag).group(1):
                image = Image.open(io.BytesIO(base64.b64decode(re.search(r'base64,([A-Za-z0-9+/=]+)', tag).group(1))))
                labels = tw.palette_labels(image.convert("RGB"))
                scores[name].append((tw.nearby_leakage(labels, reference), tw.nearby_object_leakage(labels, reference)))
    for name, values in scores.items():
        every, objects = np.mean(values, axis=0)
        print(f"{name}: nearby (README) {every:.4f}  nearby obj (object-sized regions) {objects:.4f}  "
              f"({len(values)} images)")


if __name__ == "__main__":
    main(*sys.argv[1:])
