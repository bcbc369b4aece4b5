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
