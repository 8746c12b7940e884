"""Measure existing concepts of a PERSONA_HOME with the bench's own _measure: python measure.py HOME SET CONCEPT..."""
import json, os, sys
from pathlib import Path
from persona.services.runtime.cpus import limit_threads_to_available_cpus
limit_threads_to_available_cpus()
from persona.services.app import build_app
from persona.services.runtime.settings import RuntimeSettings
from persona.client.sdk import PersonaClient
from persona.bench.quality import QualityBenchmark, Configuration, Row
from persona.services.evaluate import toyworld as tw
home, ref_name, *concepts = sys.argv[1:]
app = build_app(RuntimeSettings.from_env(data_dir=Path(home), auth="none"), "127.0.0.1:0")
client = PersonaClient.connect(app.address)
ref = tw.read_reference_set(f"/work/wt/shared/toyworld/references/{ref_name}")
bench = QualityBenchmark(client, "/work/wt/shared/toyworld/base", images_per_prompt=16, prompts_per_kind=2)
prompts = tw.bench_prompts(ref, 2)
for c in concepts:
    row = Row(Configuration.parse("case1", "dreambooth"))
    m = bench._measure(c, prompts, ref, 0, row, first=False)
    print(json.dumps({"concept": c, **{k: round(v, 4) for k, v in m.items()}}), flush=True)
app.stop(0)
