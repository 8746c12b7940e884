"""The job runner: states, events, cancellation, and recovery after a crash."""
import threading

import pytest

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from persona.services.runtime.job_store import MIGRATIONS, JobStore
from persona.services.runtime.jobs import JobRunner
from persona.services.runtime.metadata import SQLiteMetadataStore


@pytest.fixture
def store(tmp_path):
    db = SQLiteMetadataStore(tmp_path / "m.sqlite3")
    db.migrate(MIGRATIONS)
    return JobStore(db)


def finished(store, job_id, tenant="t"):
    return list(store.watch(tenant, job_id, poll_s=0.05))


def test_a_job_runs_and_its_history_replays_in_order(store):
    runner = JobRunner(store)

    def count(ctx):
        for i in range(3):
            ctx.progress((i + 1) / 3, f"item {i}", item=i)
        return {"items": 3}

    runner.register("count", count, resumable=True)
    job = runner.submit("t", "count", {"n": 3}, subject_id="subj_1")
    events = finished(store, job.job_id)
    assert [(e.type, e.state) for e in events] == [
        ("STATE", "QUEUED"), ("STATE", "RUNNING"), ("PROGRESS", ""), ("PROGRESS", ""), ("PROGRESS", ""),
        ("STATE", "SUCCEEDED")]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[3].data == {"item": 1}
    done = store.get(job.job_id, "t")
    assert (done.state, done.progress, done.result, done.attempts) == ("SUCCEEDED", 1.0, {"items": 3}, 1)
    assert [e.sequence for e in store.watch("t", job.job_id, after_sequence=4)] == [5, 6]
    with pytest.raises(NotFound):
        store.get(job.job_id, "other-tenant")


def test_domain_errors_fail_the_job_with_their_code(store):
    runner = JobRunner(store)

    def bad(ctx):
        raise InvalidArgument("`thing` is wrong")

    def crash(ctx):
        raise ZeroDivisionError("division by zero\n  in the   loss")

    runner.register("bad", bad, resumable=False)
    runner.register("crash", crash, resumable=False)
    job = runner.submit("t", "bad", {})
    finished(store, job.job_id)
    failed = store.get(job.job_id)
    assert (failed.state, failed.error_code, failed.error_message) == ("FAILED", "INVALID_ARGUMENT", "`thing` is wrong")
    job = runner.submit("t", "crash", {})
    finished(store, job.job_id)
    crashed = store.get(job.job_id)
    assert crashed.error_code == "INTERNAL" and job.job_id in crashed.error_message
    # The cause on one line (class and message), never the trace: that goes to the log only.
    assert crashed.error_message.startswith("ZeroDivisionError: division by zero in the loss (internal error")
    assert "Traceback" not in crashed.error_message and "\n" not in crashed.error_message


def test_cancel_stops_a_running_job_and_refuses_a_finished_one(store):
    runner = JobRunner(store)
    started = threading.Event()

    def wait_for_cancel(ctx):
        started.set()
        while True:
            ctx.check_cancelled()
            threading.Event().wait(0.01)

    runner.register("slow", wait_for_cancel, resumable=False)
    job = runner.submit("t", "slow", {})
    assert started.wait(10)
    runner.cancel("t", job.job_id)
    assert finished(store, job.job_id)[-1].state == "CANCELLED"
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        runner.cancel("t", job.job_id)


def test_recover_resumes_resumable_jobs_and_fails_the_rest(store):
    # Jobs a dead process left RUNNING: written straight to the store, as the crash left them.
    writer = JobRunner(store, workers=1)
    writer.register("resumable", lambda ctx: {}, resumable=True)
    writer.register("once", lambda ctx: {}, resumable=False)
    ids = {}
    for kind in ("resumable", "once"):
        ids[kind] = store.create("t", kind, {}).job_id
        store.transition(ids[kind], "RUNNING", "started", attempts=1)
    writer.shutdown(wait=True)

    restarted = JobRunner(store)
    restarted.register("resumable", lambda ctx: {"resumed": ctx.job.attempts}, resumable=True)
    restarted.register("once", lambda ctx: {}, resumable=False)
    assert sorted(restarted.recover()) == sorted(ids.values())
    finished(store, ids["resumable"])
    resumed = store.get(ids["resumable"])
    assert (resumed.state, resumed.interrupted, resumed.attempts, resumed.result) == ("SUCCEEDED", True, 2, {"resumed": 2})
    failed = store.get(ids["once"])
    assert (failed.state, failed.interrupted, failed.error_code) == ("FAILED", True, "ABORTED")
    assert "start it again" in failed.error_message
