"""A run folder holds one job: `downpour train` (and downpour.train) refuse one that holds another job's
state unless the job resumes from it, so that two jobs' checkpoints never mix."""

from __future__ import annotations

import os

import pytest

from downpour.api import check_run_dir
from downpour.config import parse_job
from downpour.errors import ConfigError

MODEL = {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}}


def job(**checkpoint):
    return parse_job({"model": MODEL, "checkpoint": checkpoint})


@pytest.mark.parametrize("left", ["summary.json", "coordinator.db", "checkpoints/ckpt-000000000300-0003"])
def test_a_run_folder_that_holds_a_job_is_refused_unless_the_job_resumes_from_it(tmp_path, left):
    run = tmp_path / "run"
    check_run_dir(job(), str(run))  # not there yet: fine
    (run / os.path.dirname(left)).mkdir(parents=True, exist_ok=True)
    (run / left).mkdir() if left.startswith("checkpoints/") else (run / left).write_text("{}")
    # A folder with a checkpoint is to be continued; one without (a job stopped before training began,
    # say) has nothing to continue from, so it is not offered a --resume that would fail.
    advice = "--resume" if left.startswith("checkpoints/") else "left no checkpoint to continue from: remove the folder"
    with pytest.raises(ConfigError, match=f"already holds a job .*{os.path.basename(left.rstrip('/').split('/')[0])}.*{advice}"):
        check_run_dir(job(), str(run))
    check_run_dir(job(resume_from=str(run)), str(run))  # continuing it, in place
    check_run_dir(job(resume_from=str(run / "checkpoints")), str(run))
    with pytest.raises(ConfigError, match="already holds a job"):
        check_run_dir(job(resume_from=str(tmp_path / "run-other")), str(run))  # a prefix of the name is not the folder


def test_the_python_apis_advice_for_a_run_folder_in_use_names_its_own_arguments(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-000000000300-0003").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"continue it with config checkpoint.resume_from='.*run', or give this job a new run_dir$"):
        check_run_dir(job(), str(run), api=True)


def test_a_model_fn_given_with_a_job_file_of_a_built_in_model_leaves_that_models_arguments_behind():
    from downpour.api import resolve_job
    from tests.api_factories import small_model

    job = resolve_job(os.path.join(os.path.dirname(__file__), "..", "examples", "mnist.yaml"), model_fn=small_model)
    assert job.model.factory == "tests.api_factories:small_model" and job.model.args == {}  # not mlp's hidden, dropout
    job = resolve_job({"model": {"factory": "tests.byo_factories:bn_cnn", "args": {"width": 8}}}, model_fn=small_model)
    assert job.model.args == {"width": 8}  # a factory's arguments are model_fn's


def test_an_empty_checkpoints_folder_or_checkpoints_kept_elsewhere_do_not_count(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    check_run_dir(job(), str(tmp_path))
    (tmp_path / "checkpoints" / "ckpt-000000000010-0001").mkdir()
    check_run_dir(job(url=str(tmp_path / "elsewhere")), str(tmp_path))  # this job writes its checkpoints elsewhere
    (tmp_path / "logs").mkdir()
    with pytest.raises(ConfigError):
        check_run_dir(job(), str(tmp_path))


def test_a_run_folder_that_cannot_be_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"the run folder .*file cannot be created: File exists"):
        check_run_dir(job(), str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"the run folder .*file/run cannot be created: Not a directory"):
        check_run_dir(job(), str(tmp_path / "file" / "run"))


def test_status_of_a_run_folder_that_is_not_there_says_so(tmp_path):
    import argparse

    from downpour.cli.status import cmd_status

    for target in (str(tmp_path / "nope"), "nope"):  # (a bare name too: no HOST:PORT either)
        args = argparse.Namespace(target=target, keys=None, json=False, insecure=False)
        with pytest.raises(ConfigError, match="no such run folder"):
            cmd_status(args)


def test_status_of_a_broken_summary_a_summary_named_and_a_job_stopped_at_once_says_what_it_is(tmp_path, capsys):
    import argparse

    from downpour.cli.main import main
    from downpour.cli.status import cmd_status

    def status(target):
        return cmd_status(argparse.Namespace(target=str(target), keys=None, json=True, insecure=False))

    run = tmp_path / "run"
    run.mkdir()
    for text in ("{not json", "{}", "[1, 2]", "\udcff"):
        (run / "summary.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ConfigError, match="summary.json (cannot be read as|is not) a job summary"):
            status(run)
    (run / "summary.json").write_text('{"status": "ok", "job": "j"}')
    assert status(run / "summary.json") == 0 and '"status": "ok"' in capsys.readouterr().out  # the file itself, named
    (run / "summary.json").write_text('{"status": "failed", "job": "j", "error": "server-0: boom"}')
    assert status(run) == 1  # a failed job: not 0, for scripts
    stopped = tmp_path / "stopped"  # hard-stopped: its coordinator's address left, nobody answering there
    stopped.mkdir()
    (stopped / "coordinator.addr").write_text("tcp://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"no summary.json, and its coordinator at tcp://127.0.0.1:9 does not answer .*--resume"):
        status(stopped)
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal
        main(["--log-level", "NOPE", "status", str(run)])
    assert stop.value.code == 2 and "invalid choice: 'NOPE'" in capsys.readouterr().err


def test_a_job_file_that_is_not_text_is_a_one_line_error(tmp_path):
    from downpour.config import load_job

    path = tmp_path / "job.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError, match=r"job file .*job.yaml is not UTF-8 text"):
        load_job(path)


def _committed(where) -> None:
    from downpour.storage import CheckpointStore
    from tests.checkpoint_helpers import commit_checkpoint

    commit_checkpoint(CheckpointStore(str(where)), 40)


def test_a_checkpoint_url_that_holds_a_jobs_checkpoints_is_refused_unless_the_job_resumes_from_there(tmp_path):
    url = tmp_path / "shared" / "ckpts"
    check_run_dir(job(url=str(url)), str(tmp_path / "a"))  # empty (made here): fine
    _committed(url)
    with pytest.raises(ConfigError, match=r"checkpoint.url .*ckpts already holds a job's checkpoints \(newest ckpt-000000000040.*--resume"):
        check_run_dir(job(url=str(url)), str(tmp_path / "b"))
    check_run_dir(job(url=str(url), resume_from=str(url)), str(tmp_path / "b"))
    # the run folder of the job that wrote there means its checkpoint.url (its config.yaml says so)
    (tmp_path / "a" / "config.yaml").write_text(f"name: a\ncheckpoint:\n  url: {url}\n")
    check_run_dir(job(url=str(url), resume_from=str(tmp_path / "a")), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="already holds a job's checkpoints"):
        check_run_dir(job(url=str(url), resume_from=str(tmp_path / "elsewhere")), str(tmp_path / "d"))
    check_run_dir(job(url=str(url), enabled=False), str(tmp_path / "e"))  # this job writes none


def test_a_checkpoint_url_no_process_can_write_to_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"memory:// is one process's memory"):
        check_run_dir(job(url="memory://ck"), str(tmp_path / "a"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"checkpoint.url .*file/ck: cannot write there"):
        check_run_dir(job(url=str(tmp_path / "file" / "ck")), str(tmp_path / "b"))
    assert not list((tmp_path / "a").glob(".downpour-write-check-*"))


def test_the_live_status_shows_the_workers_there_now_and_a_failure_of_unknown_detection_time():
    """A coordinator restarted by hand (``--recover``) records its own failure with no detection
    time; an elastic job has more workers than it planned."""
    from rich.console import Console

    from downpour.cli.status import render_live

    def node(name, role):
        return {"name": name, "role": role, "state": "alive", "host": "h", "pid": 1, "heartbeat_age_s": 0.5, "progress": {}}

    status = {"job": "j", "phase": "training", "consistency": "async", "num_servers": 1, "num_workers": 1, "elapsed_s": 9.0,
              "examples": 10, "steps": 1, "examples_per_s": 5.0, "nodes": [node("server-0", "server"), node("worker-0", "worker"),
                                                                            node("worker-1", "worker"), node("worker-2", "worker")],
              "failures": [{"node": "coordinator", "kind": "dead", "at_s": 4.0, "detected_after_s": None, "reason": "restarted"}]}
    console = Console(width=200, record=True)
    console.print(render_live(status))
    text = console.export_text()
    assert "1 servers, 3 workers (1 planned)" in text
    assert "x coordinator dead at 4.0s: restarted" in text
    status["failures"][0]["detected_after_s"] = 1.25
    status["nodes"] = status["nodes"][:2]
    console.print(render_live(status))
    text = console.export_text()
    assert "1 servers, 1 workers  up" in text and "(detected after 1.2s)" in text


def test_status_of_a_finished_run_shows_its_auc_metrics_and_checkpoints():
    from rich.console import Console

    from downpour.cli.status import render_summary

    summary = {"job": "ctr", "status": "ok", "consistency": "async", "num_servers": 2, "num_workers": 2,
               "test_accuracy": 0.78, "test_loss": 0.47, "test_auc": 0.7548, "test_logloss": 0.4788,
               "test_metrics": {"top2": 0.91}, "examples": 100, "steps": 4, "train_s": 1.0, "examples_per_s": 100.0,
               "wall_s": 2.0, "checkpoints": {"enabled": True, "count": 0, "abandoned": 2, "last": None, "url": "s3://b/ck"}}
    console = Console(width=200, record=True)
    console.print(render_summary(summary))
    text = console.export_text()
    assert "test AUC 0.7548" in text and "top2 0.9100" in text
    assert "checkpoints 0 committed (last -), 2 abandoned; s3://b/ck" in text and "cannot be resumed" in text
    resumed = {**summary, "resumed_from": "/runs/a/checkpoints/ckpt-000000000040-0002", "job_examples": 160,
               "data_shards": {"num_shards": 6, "completed_per_epoch": {"0": 6, "1": 2}, "unfinished": 4, "remaining": 10}}
    console = Console(width=200, record=True)
    console.print(render_summary(resumed))
    text = console.export_text()
    assert "resumed from /runs/a/checkpoints/ckpt-000000000040-0002: 160 examples in the job so far" in text
    assert "8 completed, 4 unfinished in the epochs begun, 10 left in the job (6 per epoch)" in text


def test_a_stream_with_more_partitions_than_workers_is_warned_about(capsys):
    from downpour.cli.main import _warn_partitions_left_unread

    def stream_job(partitions: int, workers: int):
        return parse_job({"model": {"name": "wide_deep"}, "data": {"name": "stream", "url": f"ev.jsonl?partitions={partitions}"},
                          "training": {"loss": "binary_cross_entropy"}, "cluster": {"num_workers": workers}})

    _warn_partitions_left_unread(stream_job(3, 2))
    assert "the stream has 3 partitions and the job 2 worker(s)" in capsys.readouterr().err
    _warn_partitions_left_unread(stream_job(2, 2))
    _warn_partitions_left_unread(job())  # not a stream
    assert capsys.readouterr().err == ""


def test_a_run_folder_is_made_for_its_user_only(tmp_path):
    """It holds the job's keys, state, checkpoints and model: the launcher's 0700 is not undone by a
    folder made earlier with the umask's mode."""
    check_run_dir(job(), str(tmp_path / "runs" / "a"))
    assert os.stat(tmp_path / "runs" / "a").st_mode & 0o777 == 0o700
