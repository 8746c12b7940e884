"""The server under load, bounded in time: 50 concurrent clients on 127.0.0.1 for 20 s (generate callers, WatchJob
streams left open, and probes) while health and a list call keep answering within their deadlines, and no caller
sees an error besides RESOURCE_EXHAUSTED (a busy server's answer, retried by the SDK)."""
from __future__ import annotations

import statistics
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persona.services.generate.settings import GenerateSettings
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2

DURATION_S = 20
GENERATORS, WATCHERS, PROBES = 25, 20, 5  # 50 clients
# Deadlines of the probes: a kubelet's probe timeout. The target is < 100 ms; these leave room for a loaded CI box.
PROBE_DEADLINE_S = 2.0


def test_fifty_clients_leave_health_and_lists_responsive(start_app, client_for, dog_photos):
    app = start_app(generate_settings=GenerateSettings(device="cpu"))
    owner = client_for("acme", app)
    subject = owner.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    # A job that runs through the whole test, for the watchers to follow (cancelled at the end).
    job = owner.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=100000, resolution=32, checkpoint_every=0)))
    request = generate_pb2.GenerateRequest(base_model="tiny", prompts=["a dog"], steps=2, width=32, height=32)
    list(owner.generate.Generate(request))  # the model loaded before the clock starts

    stop = threading.Event()
    errors: list[str] = []
    latencies: dict[str, list[float]] = {"health": [], "ListSubjects": []}
    counts = {"images": 0, "exhausted": 0, "watch_events": 0}
    lock = threading.Lock()

    def record(kind: str, error: grpc.RpcError) -> None:
        with lock:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                counts["exhausted"] += 1
            else:
                errors.append(f"{kind}: {error.code().name} {error.details()}")

    def generator():
        client = client_for("acme", app)
        while not stop.is_set():
            try:
                images = list(client.generate.Generate(request, timeout=30))
                with lock:
                    counts["images"] += len(images)
            except grpc.RpcError as e:
                record("Generate", e)

    def watcher():
        client = client_for("acme", app)
        stream = client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=DURATION_S + 30)
        try:
            for _ in stream:
                with lock:
                    counts["watch_events"] += 1
                if stop.is_set():
                    break
        except grpc.RpcError as e:
            record("WatchJob", e)
        finally:
            stream.cancel()

    def prober():
        client = client_for("acme", app)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(app.address))
        while not stop.is_set():
            for name, call in (("health", lambda: health.Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=PROBE_DEADLINE_S)),
                               ("ListSubjects", lambda: client.subjects.ListSubjects(
                                   subjects_pb2.ListSubjectsRequest(), timeout=PROBE_DEADLINE_S))):
                started = time.perf_counter()
                try:
                    call()
                    with lock:
                        latencies[name].append(time.perf_counter() - started)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{name}: {e.code().name} {e.details()}")
            time.sleep(0.05)

    threads = [threading.Thread(target=t) for t in [generator] * GENERATORS + [watcher] * WATCHERS + [prober] * PROBES]
    for thread in threads:
        thread.start()
    time.sleep(DURATION_S)
    stop.set()
    owner.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))  # ends the watchers' streams
    for thread in threads:
        thread.join(timeout=60)

    def ms(values, q):
        return f"{statistics.quantiles(values, n=100)[q - 1] * 1e3:.0f}" if len(values) > 1 else "-"

    print(f"\n{GENERATORS + WATCHERS + PROBES} clients for {DURATION_S}s: images {counts['images']}, "
          f"RESOURCE_EXHAUSTED {counts['exhausted']}, watch events {counts['watch_events']}; " + "; ".join(
              f"{name} n={len(v)} p50 {ms(v, 50)} ms p99 {ms(v, 99)} ms max {max(v) * 1e3:.0f} ms"
              for name, v in latencies.items() if v))
    assert not errors, errors[:5]
    assert all(not t.is_alive() for t in threads)
    assert latencies["health"] and latencies["ListSubjects"] and counts["images"]
