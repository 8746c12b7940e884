"""persona-cli in its embedded default (the services started in-process on a tmp data dir), driven
through Typer's CliRunner on DreamBench photos: subjects, captions, jobs, keys, errors and --json."""
from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from persona.client.cli import app

COMPLIANT = "a photo of a sks dog lying on a green lawn next to a red rubber ball"
# Variables a developer's shell may carry that would change what the CLI talks to.
CLEARED_ENV = ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_HOME", "PERSONA_AUTH", "PERSONA_VLM_BASE_URL",
               "PERSONA_VLM_MODEL", "PERSONA_VLM_API_KEY")


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def cli(data_dir, monkeypatch):
    """cli(*args, env=None) → the Result of `persona-cli --data-dir <tmp> *args`, run in-process."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def run(*args: str, env: dict | None = None, data: object = data_dir):
        return runner.invoke(app, ["--data-dir", str(data), *map(str, args)], env=env)

    return run


def ok(result) -> str:
    """The stdout of a command that must have succeeded (its stderr shown if it did not)."""
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def ok_json(result):
    return json.loads(ok(result))


def failed(result, code: str) -> str:
    """The one stderr line of a command that must have failed with `code`, exit status 1, no traceback."""
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{code}: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.fixture
def dog_dir(dreambench):
    return dreambench / "dog"


@pytest.fixture
def subject(cli, dog_dir) -> dict:
    return ok_json(cli("subjects", "add", dog_dir, "--class", "dog", "--name", "Bruno", "--json"))


def test_subject_caption_flow(cli, dog_dir):
    photos = sorted(dog_dir.glob("*.jpg"))
    added = cli("subjects", "add", dog_dir, "--class", "dog", "--token", "sks", "--name", "Bruno")
    shown_on_add = ok(added)
    assert "created subj_" in added.stderr  # the hint goes to stderr, the subject to stdout

    listed = ok_json(cli("subjects", "list", "--json"))["subjects"]
    assert len(listed) == 1
    subject_id = listed[0]["subject_id"]
    assert subject_id in shown_on_add and subject_id in ok(cli("subjects", "list"))

    subject = ok_json(cli("subjects", "show", subject_id, "--json"))
    assert (subject["class_name"], subject["token"], subject["display_name"]) == ("dog", "sks", "Bruno")
    assert [i["filename"] for i in subject["images"]] == [p.name for p in photos]
    assert [i["index"] for i in subject["images"]] == list(range(len(photos)))
    assert [int(i["size_bytes"]) for i in subject["images"]] == [p.stat().st_size for p in photos]

    captioned = cli("caption", subject_id, "--case", "1", "--json")
    result = ok_json(captioned)
    assert result["job"]["state"] == "JOB_STATE_SUCCEEDED" and result["job"]["subject_id"] == subject_id
    assert [c["image"]["image_id"] for c in result["captions"]] == [i["image_id"] for i in subject["images"]]
    assert {c["text"] for c in result["captions"]} == {"a photo of a sks dog"}
    assert {c["source"] for c in result["captions"]} == {"CAPTION_SOURCE_TEMPLATE"}
    assert result["job"]["job_id"] in captioned.stderr  # "captioning 5 photos … job job_…"

    human = ok(cli("captions", "show", subject_id))
    assert human.count("a photo of a sks dog") == len(photos)

    written = ok_json(cli("captions", "set", subject_id, "1", "a photo of a sks dog on a red sofa", "--json"))
    assert written["source"] == "CAPTION_SOURCE_USER"
    assert written["image"]["image_id"] == subject["images"][1]["image_id"]
    by_id = ok(cli("captions", "set", subject_id, subject["images"][2]["image_id"], "a sks dog in the snow"))
    assert "a sks dog in the snow" in by_id

    captions = ok_json(cli("captions", "show", subject_id, "--json"))["captions"]
    assert [c["text"] for c in captions] == ["a photo of a sks dog", "a photo of a sks dog on a red sofa",
                                             "a sks dog in the snow", "a photo of a sks dog", "a photo of a sks dog"]
    assert "a photo of a sks dog on a red sofa" in ok(cli("captions", "show", subject_id))

    removed = cli("subjects", "rm", subject_id)
    assert ok(removed).strip() == subject_id
    line = failed(cli("subjects", "show", subject_id), "NOT_FOUND")
    assert subject_id in line
    assert ok_json(cli("subjects", "list", "--json")) == {"subjects": []}


def test_caption_keeps_user_captions_unless_overwrite_user(cli, subject):
    subject_id = subject["subject_id"]
    ok(cli("captions", "set", subject_id, "0", "a sks dog on a boat"))
    ok(cli("caption", subject_id, "--case", "1"))
    assert ok_json(cli("captions", "show", subject_id, "--json"))["captions"][0]["text"] == "a sks dog on a boat"
    ok(cli("caption", subject_id, "--case", "1", "--overwrite-user"))
    assert ok_json(cli("captions", "show", subject_id, "--json"))["captions"][0]["text"] == "a photo of a sks dog"


def test_caption_only_the_images_named_by_index_or_id(cli, subject):
    subject_id, images = subject["subject_id"], subject["images"]
    result = ok_json(cli("caption", subject_id, "--case", "1", "--image", "3", "--image", images[0]["image_id"],
                         "--json"))
    assert sorted(c["image"]["image_id"] for c in result["captions"]) == sorted(
        [images[0]["image_id"], images[3]["image_id"]])
    human = ok(cli("captions", "show", subject_id))
    assert human.count("(no caption yet)") == len(images) - 2


def test_style_mode_writes_the_style_template(cli, dog_dir):
    style = ok_json(cli("subjects", "add", dog_dir / "00.jpg", "--class", "painting", "--json"))
    result = ok_json(cli("caption", style["subject_id"], "--case", "1", "--mode", "style", "--json"))
    assert [c["text"] for c in result["captions"]] == ["A painting in the style of sks art"]
    assert result["captions"][0]["mode"] == "CAPTION_MODE_STYLE"


def test_case_3_through_a_vlm_set_by_environment(cli, subject, fake_vlm):
    fake_vlm.script(COMPLIANT)
    env = {"PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm", "PERSONA_VLM_API_KEY": "x",
           "PERSONA_VLM_RETRIES": "0"}
    result = ok_json(cli("caption", subject["subject_id"], "--json", env=env))  # case 3 is the default
    assert result["job"]["params"]["case"] == 3
    assert [c["text"] for c in result["captions"]] == [COMPLIANT] * len(subject["images"])
    assert {(c["source"], c["model"]) for c in result["captions"]} == {("CAPTION_SOURCE_VLM", "fake-vlm")}
    assert len(fake_vlm.requests) == len(subject["images"])
    assert {r["model"] for r in fake_vlm.requests} == {"fake-vlm"}


def test_case_3_without_a_vlm_fails_with_the_server_code(cli, subject):
    line = failed(cli("caption", subject["subject_id"], "--case", "3"), "FAILED_PRECONDITION")
    assert "PERSONA_VLM_BASE_URL" in line


@pytest.mark.parametrize("key, shown", [("sk-…", "'…' (U+2026) at character 4"),
                                        ("sk-abc def", "a space or control character (U+0020) at character 7")])
def test_a_key_no_http_header_can_carry_is_refused_naming_the_setting(cli, subject, fake_vlm, key, shown):
    fake_vlm.script(COMPLIANT)
    env = {"PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm", "PERSONA_VLM_API_KEY": key}
    line = failed(cli("caption", subject["subject_id"], env=env), "FAILED_PRECONDITION")
    assert f"PERSONA_VLM_API_KEY holds {shown}" in line and "real key" in line
    assert key not in line  # the key itself is never echoed
    assert fake_vlm.requests == []  # refused before any call


def test_caption_job_that_fails_exits_1_with_its_error(cli, subject, fake_vlm):
    fake_vlm.script("a photo of a brown fluffy dog lying on a rug")  # describes the subject: never compliant
    env = {"PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm", "PERSONA_VLM_API_KEY": "x",
           "PERSONA_VLM_ATTEMPTS": "1"}
    result = cli("caption", subject["subject_id"], "--image", "0", env=env)
    failed(result, "FAILED_PRECONDITION")
    assert result.stdout == ""
    shown = ok_json(cli("captions", "show", subject["subject_id"], "--json"))["captions"]
    assert len(shown) == 1 and shown[0]["failure"] and shown[0]["text"] == ""
    assert "FAILED: " in ok(cli("captions", "show", subject["subject_id"]))


def test_bad_input_is_one_line_and_nothing_is_stored(cli, dog_dir, tmp_path):
    missing_class = cli("subjects", "add", dog_dir)
    assert missing_class.exit_code == 2 and "--class" in missing_class.output
    assert "Traceback" not in missing_class.output

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    line = failed(cli("subjects", "add", dog_dir / "00.jpg", not_an_image, "--class", "dog"), "INVALID_ARGUMENT")
    assert "images[1]" in line and str(not_an_image) in line

    nowhere = tmp_path / "no-such-folder"
    assert str(nowhere) in failed(cli("subjects", "add", nowhere, "--class", "dog"), "INVALID_ARGUMENT")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in failed(cli("subjects", "add", empty, "--class", "dog"), "INVALID_ARGUMENT")

    assert "class_name" in failed(cli("subjects", "add", dog_dir, "--class", "d@g"), "INVALID_ARGUMENT")
    assert "token" in failed(cli("subjects", "add", dog_dir, "--class", "dog", "--token", "two words"),
                             "INVALID_ARGUMENT")
    assert ok_json(cli("subjects", "list", "--json")) == {"subjects": []}

    bad_case = cli("caption", "subj_x", "--case", "5")
    assert bad_case.exit_code == 2 and "Traceback" not in bad_case.output


def test_caption_errors_name_what_to_fix(cli, subject):
    subject_id = subject["subject_id"]
    assert "out of range" in failed(cli("captions", "set", subject_id, "9", "a sks dog"), "INVALID_ARGUMENT")
    assert "sks" in failed(cli("captions", "set", subject_id, "0", "a dog on a sofa"), "INVALID_ARGUMENT")
    failed(cli("captions", "set", subject_id, "img_nope", "a sks dog"), "NOT_FOUND")
    failed(cli("caption", "subj_nope", "--case", "1"), "NOT_FOUND")
    failed(cli("caption", subject_id, "--case", "1", "--image", "7"), "INVALID_ARGUMENT")


def test_data_persists_across_invocations_of_the_same_data_dir(cli, dog_dir, tmp_path):
    created = ok_json(cli("subjects", "add", dog_dir, "--class", "dog", "--json"))
    ok(cli("caption", created["subject_id"], "--case", "1"))
    # Each invocation started and stopped its own in-process server; the next one finds the data.
    again = ok_json(cli("subjects", "show", created["subject_id"], "--json"))
    assert again == created
    assert len(ok_json(cli("captions", "show", created["subject_id"], "--json"))["captions"]) == len(created["images"])
    assert ok_json(cli("subjects", "list", "--json", data=tmp_path / "other")) == {"subjects": []}


def test_jobs_list_show_watch_cancel(cli, subject):
    subject_id = subject["subject_id"]
    job = ok_json(cli("caption", subject_id, "--case", "1", "--json"))["job"]
    listed = ok_json(cli("jobs", "list", "--subject", subject_id, "--json"))["jobs"]
    assert [j["job_id"] for j in listed] == [job["job_id"]]
    assert ok_json(cli("jobs", "list", "--kind", "train", "--json")) == {"jobs": []}
    assert job["job_id"] in ok(cli("jobs", "list"))

    shown = ok_json(cli("jobs", "show", job["job_id"], "--json"))
    assert shown["state"] == "JOB_STATE_SUCCEEDED" and shown["result"]["captioned"] == len(subject["images"])
    assert shown["caption_result"]["captioned"] == len(subject["images"])  # typed: an int, not 4.0
    text = ok(cli("jobs", "show", job["job_id"]))
    assert "SUCCEEDED" in text and f'"captioned": {len(subject["images"])}' in text
    watched = ok_json(cli("jobs", "watch", job["job_id"], "--json"))  # a finished job: replays and returns
    assert watched["state"] == "JOB_STATE_SUCCEEDED"

    failed(cli("jobs", "cancel", job["job_id"]), "FAILED_PRECONDITION")
    failed(cli("jobs", "show", "job_nope"), "NOT_FOUND")


def test_root_json_flag_applies_to_every_command(cli, subject):
    listed = ok_json(cli("--json", "subjects", "list"))  # persona-cli --data-dir … --json subjects list
    assert [s["subject_id"] for s in listed["subjects"]] == [subject["subject_id"]]


def test_keys_create_list_rm_on_the_data_dir(cli, data_dir):
    created = cli("keys", "create", "acme", "--name", "ci")
    key = ok(created).strip()
    assert key.startswith("pk_") and "shown only once" in created.stderr
    keys = ok_json(cli("keys", "list", "--json"))["keys"]
    assert [(k["tenant_id"], k["name"]) for k in keys] == [("acme", "ci")]
    assert key not in json.dumps(keys)
    as_json = ok_json(cli("keys", "create", "globex", "--json"))
    assert as_json["tenant_id"] == "globex" and as_json["key"].startswith("pk_")

    ok(cli("keys", "rm", keys[0]["key_id"]))
    assert [k["tenant_id"] for k in ok_json(cli("keys", "list", "--json"))["keys"]] == ["globex"]
    failed(cli("keys", "rm", keys[0]["key_id"]), "NOT_FOUND")
    assert "tenant" in failed(cli("keys", "create", "Not A Tenant"), "INVALID_ARGUMENT")


def test_unreachable_server_is_unavailable(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("--server", f"127.0.0.1:{port}", "subjects", "list", env={"PERSONA_CONNECT_TIMEOUT_S": "0.5"})
    assert "persona-cli serve" in failed(result, "UNAVAILABLE")


@pytest.mark.parametrize("command", [
    [], ["subjects", "add"], ["subjects", "list"], ["subjects", "show"], ["subjects", "rm"], ["caption"],
    ["captions", "show"], ["captions", "set"], ["jobs", "list"], ["jobs", "show"], ["jobs", "watch"],
    ["jobs", "cancel"], ["keys", "create"], ["keys", "list"], ["keys", "rm"], ["serve"],
])
def test_help_teaches_with_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout and "persona-cli" in result.stdout


def test_subjects_add_takes_a_folder_of_phone_photos(cli, dreambench):
    """bear_plushie's photos are all MPO (the multi-picture JPEG phones write): the folder uploads as is."""
    folder = dreambench / "bear_plushie"
    subject = ok_json(cli("subjects", "add", folder, "--class", "stuffed animal", "--json"))
    assert len(subject["images"]) == len(list(folder.glob("*.jpg")))
    assert {i["media_type"] for i in subject["images"]} == {"image/jpeg"}


def test_train_help_states_the_defaults(cli):
    """--help says what the defaults do now: prior preservation stays on when regularisers are added, uncaptioned
    photos are warned about, style subjects use SID's style template."""
    import typer

    ok(cli("train", "--help"))
    command = typer.main.get_command(app).commands["train"]
    text = " ".join(p.help or "" for p in command.params)  # what --help prints, before rich wraps it in a box
    for phrase in ("stays on when you add others", "--no-prior", "the job says so in a warning",
                   "A painting in the style of sks art"):
        assert phrase in text, phrase
    assert "contradict" in failed(cli("train", "subj_x", "--no-prior", "--reg", "prior"), "INVALID_ARGUMENT")
