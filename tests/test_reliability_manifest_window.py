"""A kill between the end of training and the manifest write must not lose the training."""
from __future__ import annotations

from test_reliability import KILLED, assert_same_results, assert_valid, run


def test_kill_inside_the_manifest_write_of_a_trained_arm_does_not_lose_the_training(tmp_path, fake_flowers_session):
    """The checkpoint is a resume-only file: the runner deletes it after the manifest, not before."""
    reference_root, root = tmp_path / "reference", tmp_path / "cache"
    run("cnn", fake_flowers_session, reference_root)
    run("cnn", fake_flowers_session, root, fault="*/cnn/*/manifest.json:kill", expect=KILLED)
    log = run("cnn", fake_flowers_session, root)
    assert "resuming after epoch 3/3" in log, log
    assert_valid(root, "cnn/bn-cnn")
    assert_same_results(root, reference_root, "cnn/bn-cnn")
