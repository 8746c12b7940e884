"""The job runner's dispatched kinds (worker handed off, followed, cancelled, taken over after a restart), the
worker side (`run_here`) and job ownership on a store shared between processes (heartbeat, compare-and-set)."""
import threading
import time

import pytest

from persona.services.runtime import dispatch
from persona.services.runtime.errors import FailedPrecondition, Unavailable
from persona.services.runtime.job_store import MIGRATIONS, JobStore
from persona.services.runtime.jobs import JobRunner
from persona.services.runtime.metadata import SQLiteMetadataStore


@pytest.fixture
def store(tmp_path):
    db = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    db.migrate(MIGRATIONS)
    return JobStore(db)


class FakeDispatcher:
    """Workers as entries in a dict; the test plays the worker with `run_here` on a second runner."""

    name = "fake"

    def __init__(self):
        self.states: dict[str, str] = {}
        self.cancelled: list[str] = []
        self.fail_submit: Exception | None = None

    def submit(self, job):
        if self.fail_submit is not None:
            raise self.fail_submit
        handle = f"w-{job.job_id}"
        self.states[handle] = dispatch.PENDING
        return handle

    def state(self, handle):
        return self.states.get(handle, dispatch.GONE)

    def cancel(self, handle):
        self.cancelled.append(handle)
        self.states.pop(handle, None)


def runners(store, dispatcher, handler, **options):
    """The server's runner (dispatches `train`) and a worker's runner (runs it), as in two processes."""
    server, worker = JobRunner(store, heartbeat_s=60, **options), JobRunner(store, heartbeat_s=60, **options)
    server.register("train", handler, resumable=True, dispatcher=dispatcher)
    worker.register("train", handler, resumable=True, dispatcher=dispatcher)
    return server, worker


def events(store, job_id):
    return [(e.type, e.state, e.message) for e in store.events_after(job_id, 0)]


def test_a_dispatched_job_runs_in_the_worker_and_is_followed_to_its_end(store):
    ran_in = []
    fake = FakeDispatcher()
    server, worker = runners(store, fake, lambda ctx: ran_in.append(threading.current_thread().name) or {"steps": 3})
    job = server.submit("t", "train", {"concept_id": "c1"})
    assert job.state == "QUEUED" and job.dispatch_handle == f"fake:w-{job.job_id}"
    assert ("LOG", "", f"handed to a fake worker (fake:w-{job.job_id})") in events(store, job.job_id)
    time.sleep(0.2)
    assert not ran_in  # nothing ran on the server's threads

    fake.states[f"w-{job.job_id}"] = dispatch.RUNNING
    done = worker.run_here(job.job_id)
    assert done.state == "SUCCEEDED" and done.result == {"steps": 3}
    assert ran_in == [threading.current_thread().name]
    fake.states[f"w-{job.job_id}"] = dispatch.SUCCEEDED
    server.check_dispatched()
    assert store.get(job.job_id).state == "SUCCEEDED"
    assert [e[1] for e in events(store, job.job_id) if e[0] == "STATE"] == ["QUEUED", "RUNNING", "SUCCEEDED"]


@pytest.mark.parametrize("worker_state, ended", [(dispatch.FAILED, "failed"), (dispatch.GONE, "disappeared"),
                                                 (dispatch.SUCCEEDED, "exited without recording an outcome")])
def test_a_worker_that_ends_without_an_outcome_fails_its_job_saying_so(store, worker_state, ended):
    fake = FakeDispatcher()
    server, _ = runners(store, fake, lambda ctx: {})
    job = server.submit("t", "train", {})
    store.transition(job.job_id, "RUNNING", "attempt 1 started")  # the worker started, then was OOM-killed
    server.check_dispatched()
    assert store.get(job.job_id).state == "RUNNING"  # still pending in the fake: nothing to say yet
    fake.states[f"w-{job.job_id}"] = worker_state
    server.check_dispatched()
    failed = store.get(job.job_id)
    assert failed.state == "FAILED" and failed.error_code == "ABORTED"
    assert failed.error_message == (f"the fake worker of job {job.job_id} (fake:w-{job.job_id}) {ended}; "
                                    "its logs tell why")
    server.check_dispatched()  # already finished: stays as it is, one terminal event
    assert [e[1] for e in events(store, job.job_id) if e[0] == "STATE"] == ["QUEUED", "RUNNING", "FAILED"]


def test_cancel_removes_a_waiting_worker_and_lets_a_running_one_stop_itself(store):
    fake = FakeDispatcher()
    release = threading.Event()

    def train(ctx):
        release.wait(5)
        ctx.check_cancelled()
        return {}

    server, worker = runners(store, fake, train)
    waiting = server.submit("t", "train", {})
    assert server.cancel("t", waiting.job_id).state == "CANCELLED"
    assert fake.cancelled == [f"w-{waiting.job_id}"]

    running = server.submit("t", "train", {})
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_here(running.job_id)))
    thread.start()
    while store.get(running.job_id).state != "RUNNING":
        time.sleep(0.01)
    assert server.cancel("t", running.job_id).cancel_requested
    assert fake.cancelled == [f"w-{waiting.job_id}"]  # the running worker is told through the store
    release.set()
    thread.join(5)
    assert outcome[0].state == "CANCELLED"


def test_a_cancelled_job_whose_worker_died_is_cancelled_not_failed(store):
    fake = FakeDispatcher()
    server, _ = runners(store, fake, lambda ctx: {})
    job = server.submit("t", "train", {})
    store.transition(job.job_id, "RUNNING", "attempt 1 started")
    server.cancel("t", job.job_id)
    fake.states[f"w-{job.job_id}"] = dispatch.FAILED  # killed before its next check
    server.check_dispatched()
    assert store.get(job.job_id).state == "CANCELLED"


def test_a_worker_that_cannot_be_started_fails_the_job_and_the_call(store):
    fake = FakeDispatcher()
    fake.fail_submit = RuntimeError("403 Forbidden: jobs.batch is forbidden")
    server, _ = runners(store, fake, lambda ctx: {})
    with pytest.raises(Unavailable, match="could not start a fake worker .*RuntimeError"):
        server.submit("t", "train", {})
    [job] = store.db.query("SELECT job_id, state, error_code FROM jobs")
    assert (job["state"], job["error_code"]) == ("FAILED", "UNAVAILABLE")

    fake.fail_submit = FailedPrecondition("PERSONA_K8S_IMAGE is empty")
    with pytest.raises(FailedPrecondition, match="PERSONA_K8S_IMAGE"):
        server.submit("t", "train", {})


def test_a_restarted_server_follows_the_workers_of_the_previous_one(store):
    fake = FakeDispatcher()
    first, _ = runners(store, fake, lambda ctx: {})
    job = first.submit("t", "train", {})
    first.shutdown()

    second, _ = runners(store, fake, lambda ctx: pytest.fail("a dispatched job must not run on the server"))
    assert second.recover() == [job.job_id]
    time.sleep(0.2)
    assert store.get(job.job_id).state == "QUEUED"  # still the worker's
    fake.states[f"w-{job.job_id}"] = dispatch.GONE
    second.check_dispatched()
    assert store.get(job.job_id).state == "FAILED"

    # A server that no longer uses that dispatcher says so instead of leaving the job QUEUED forever.
    orphan = first.store.create("t", "train", {})
    store.update(orphan.job_id, dispatch_handle="kubernetes:persona-train-x")
    third = JobRunner(store, heartbeat_s=60)
    third.register("train", lambda ctx: {}, resumable=True)
    third.recover()
    failed = store.get(orphan.job_id)
    assert failed.state == "FAILED" and "kubernetes worker, which this server does not use any more" in \
        failed.error_message


def test_the_worker_resumes_a_job_its_previous_pod_left_running(store):
    fake = FakeDispatcher()
    _, worker = runners(store, fake, lambda ctx: {"resumed": ctx.job.interrupted})
    job = store.create("t", "train", {})
    store.transition(job.job_id, "RUNNING", "attempt 1 started", attempts=1)
    done = worker.run_here(job.job_id)
    assert done.state == "SUCCEEDED" and done.result == {"resumed": True} and done.attempts == 2
    assert worker.run_here(job.job_id).state == "SUCCEEDED"  # finished: run-job again changes nothing

    other = store.create("t", "caption", {})
    with pytest.raises(FailedPrecondition, match="`caption` job, which this worker cannot run"):
        worker.run_here(other.job_id)


def test_on_a_shared_store_a_replica_takes_over_only_jobs_whose_owner_stopped_beating(store):
    store.db.shared_between_processes = True  # as PostgresMetadataStore declares
    release = threading.Event()
    started = []

    def train(ctx):
        started.append(ctx.job.job_id)
        release.wait(10)
        return {}

    alive = JobRunner(store, heartbeat_s=60, stale_after_s=30)
    alive.register("train", train, resumable=True)
    held = alive.submit("t", "train", {})
    while not started:
        time.sleep(0.01)

    replicas = []
    for _ in range(2):
        replica = JobRunner(store, heartbeat_s=60, stale_after_s=30)
        replica.register("train", lambda ctx: {"by": "replica"}, resumable=True)
        replicas.append(replica)
    assert not replicas[0].exclusive
    assert replicas[0].recover() == []  # its owner beats: not ours
    assert store.get(held.job_id).owner == alive.owner

    store.update(held.job_id, heartbeat_at=time.time() - 31)  # the owner died 31 s ago
    stale = store.get(held.job_id)
    taken = [replica.recover() for replica in replicas]
    assert sorted(map(len, taken)) == [0, 1]  # exactly one replica took it
    winner = replicas[[len(t) for t in taken].index(1)]
    finished = list(store.watch("t", held.job_id, poll_s=0.05))
    assert finished[-1].state == "SUCCEEDED" and store.get(held.job_id).result == {"by": "replica"}
    assert store.get(held.job_id).owner == winner.owner and store.get(held.job_id).interrupted
    assert not store.claim(stale, "late-comer")  # the compare-and-set refuses a stale read
    release.set()
    for runner in (alive, *replicas):
        runner.shutdown(wait=True, timeout_s=5)


def test_the_heartbeat_keeps_a_long_job_owned(store):
    store.db.shared_between_processes = True
    release = threading.Event()
    owner = JobRunner(store, heartbeat_s=0.05, stale_after_s=0.5)
    owner.register("train", lambda ctx: release.wait(10) and {}, resumable=True)
    job = owner.submit("t", "train", {})
    time.sleep(1.0)  # twice the stale age, with the owner beating every 0.05 s
    other = JobRunner(store, heartbeat_s=60, stale_after_s=0.5)
    other.register("train", lambda ctx: pytest.fail("taken from a live owner"), resumable=True)
    assert other.recover() == []
    assert time.time() - store.get(job.job_id).heartbeat_at < 0.5
    release.set()
    owner.shutdown(wait=True, timeout_s=5)


def test_a_pod_serving_other_services_leaves_their_jobs_alone(store):
    stranded = store.create("t", "train", {})
    store.transition(stranded.job_id, "RUNNING", "attempt 1 started")
    caption_pod = JobRunner(store, heartbeat_s=60)
    caption_pod.register("train", lambda ctx: {}, resumable=True)
    caption_pod.register("caption", lambda ctx: {}, resumable=True)
    caption_pod.serve_only({"caption"})
    assert caption_pod.recover() == [] and store.get(stranded.job_id).state == "RUNNING"
    with pytest.raises(FailedPrecondition, match="no service on this server runs `train` jobs"):
        caption_pod.submit("t", "train", {})
