"""One job of `cnnlab train`, in this process: what a run shows at its end, however it ended."""

from tests.helpers import TINY


def test_a_run_ends_with_its_table_and_findings_and_a_diverged_one_with_its_findings_alone(run_cli):
    code, out, err = run_cli("train", *TINY, "hydra.run.dir=good")
    assert code == 0, err
    assert out.startswith("cnnlab: mlp + relu on fake (270 train / 30 val / 50 test), ")
    assert out.index("epoch 1/1") < out.index("cnnlab run: completed") < out.index("Findings")
    code, out, err = run_cli("train", *TINY, "dataset.train_size=600", "trainer.batch_size=30", "optimizer=sgd",
                             "optimizer.lr=1e4", "optimizer.momentum=0.9", "scheduler=onecycle",
                             "trainer.epochs=4", "hydra.run.dir=bad")
    assert code == 3 and "non-finite" in err
    assert "cnnlab run:" not in out and "Findings" in out  # no table: the error message says how it ended


def test_a_stopped_run_says_whether_it_can_be_resumed(tmp_path, capsys):
    import signal

    from cnnlab.cli.job import Job, tell_error
    from cnnlab.rundir import last_checkpoint
    from cnnlab.status import Status
    from cnnlab.train.loop import Interrupted

    job = Job(run_dir=tmp_path, multirun=False, num=0, task_overrides=[], override_dirname="", n_jobs=None)
    assert tell_error(Interrupted(signal.SIGTERM, 3), job) == Status.INTERRUPTED
    assert "before its first checkpoint: there is nothing to resume; run it again" in capsys.readouterr().err
    last_checkpoint(tmp_path).parent.mkdir()
    last_checkpoint(tmp_path).write_bytes(b"")
    assert tell_error(Interrupted(signal.SIGTERM, 3), job) == Status.INTERRUPTED
    assert f"with a checkpoint; continue with: cnnlab train resume={tmp_path}" in capsys.readouterr().err
