import pytest
import torch
from ignite.engine import Engine, Events

from custom import RegistrationNet
from custom.workflow import (
    AtomicCheckpointSaver,
    WarpedDice,
    WarpedNCC,
    latest_checkpoint,
    prepare_labelled_pair_batch,
    prepare_pair_batch,
    validation_metric,
)


def test_prepare_pair_batch_stacks_moving_then_fixed():
    batch = {"moving": torch.zeros(2, 1, 4, 4), "fixed": torch.ones(2, 1, 4, 4)}
    inputs, targets = prepare_pair_batch(batch, "cpu")
    assert inputs.shape == (2, 2, 4, 4) and inputs is targets
    assert inputs[:, 0].sum() == 0 and inputs[:, 1].sum() == 32


def test_warped_ncc_metric_over_an_epoch():
    image = torch.rand(3, 1, 16, 16)
    outputs = [{"pred": torch.zeros(2, 16, 16), "label": torch.cat([image[i], image[i]], 0)} for i in range(3)]
    engine = Engine(lambda e, b: outputs)  # a decollated output, as MONAI engines produce
    WarpedNCC(2, 5).attach(engine, "ncc")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["ncc"] == pytest.approx(1.0, abs=1e-4)


def test_latest_checkpoint_is_numeric_and_of_the_current_run(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 9, 10):
        (tmp_path / f"checkpoint_{epoch}.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_10.pt")  # no run.json: any checkpoint
    (tmp_path / "run.json").write_text('{"run_id": "new"}')
    (tmp_path / "old_checkpoint_50.pt").write_bytes(b"")  # a stale file of an earlier run
    assert latest_checkpoint(tmp_path) is None
    for epoch in (3, 4):
        (tmp_path / f"new_checkpoint_{epoch}.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).endswith("new_checkpoint_4.pt")


def test_best_score_survives_a_restart(tmp_path):
    """The best-model saver's state (its best score) restored in a new process: a worse score saves nothing."""
    net = RegistrationNet(2, "both")

    def evaluator(scores):
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: e.state.metrics.__setitem__("val_ncc", scores[e.state.epoch - 1])
        )
        return engine

    first = AtomicCheckpointSaver(str(tmp_path), {"network": net}, "EPOCH_COMPLETED", "model.pt", "val_ncc")
    engine = evaluator([0.5, 0.3])
    first.attach(engine)
    engine.run([0], max_epochs=2)
    saved = (tmp_path / "model.pt").stat().st_mtime_ns
    state = first.checkpoint.state_dict()
    with torch.no_grad():
        net.flow.bias.fill_(1.0)  # a later, worse model
    second = AtomicCheckpointSaver(str(tmp_path), {"network": net}, "EPOCH_COMPLETED", "model.pt", "val_ncc")
    engine = evaluator([0.4, 0.6])
    second.attach(engine)
    second.checkpoint.load_state_dict(state)
    engine.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").stat().st_mtime_ns == saved  # 0.4 < 0.5: kept
    engine.run([0], max_epochs=2)
    assert (tmp_path / "model.pt").stat().st_mtime_ns != saved  # 0.6 > 0.5: replaced


def test_atomic_saver_fixed_name_and_rotation(tmp_path):
    net = RegistrationNet(2, "both")
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path / "best"), {"network": net}, filename="model.pt").attach(engine)
    AtomicCheckpointSaver(str(tmp_path / "resume"), {"network": net, "engine": engine}).attach(engine)
    engine.run([0], max_epochs=3)
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["model.pt"]  # kept, not rotated away
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["checkpoint_3.pt"]  # only the last one
    state = torch.load(tmp_path / "best" / "model.pt", weights_only=True)
    RegistrationNet(2, "both").load_state_dict(state)


def test_a_run_killed_while_saving_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    """Ignite's Checkpoint removes the file it replaces before saving the new one; our saver removes it only once
    the new one is in place, so a failure (or SIGKILL) during the save leaves the previous checkpoint."""
    from ignite.handlers import DiskSaver

    net = RegistrationNet(2, "both")
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"network": net, "engine": engine}).attach(engine)
    engine.run([0], max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_2.pt"]

    def killed(self, checkpoint, filename, metadata=None):
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(DiskSaver, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_2.pt"]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_2.pt")


def test_prepare_labelled_pair_batch_keeps_the_labels_out_of_the_input():
    moving, fixed = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    labels = torch.randint(0, 4, (2, 1, 8, 8)).int()
    batch = {"moving": moving, "fixed": fixed, "moving_label": labels, "fixed_label": labels + 1}
    inputs, target = prepare_labelled_pair_batch(batch)
    assert inputs.shape == (2, 2, 8, 8) and target.shape == (2, 4, 8, 8) and target.dtype == torch.float32
    assert torch.equal(target[:, :2], inputs) and torch.equal(target[:, 3:], (labels + 1).float())
    with pytest.raises(ValueError, match="the pairs carry no label maps"):
        prepare_labelled_pair_batch({"moving": moving, "fixed": fixed})


def test_warped_dice_metric_over_an_epoch():
    """A zero field scores the maps' own overlap; a field that undoes a shift scores 1; labels need 4 channels."""
    fixed = torch.zeros(1, 1, 12, 12)
    fixed[..., 2:8, 2:8] = 1
    moving = torch.roll(fixed, 2, dims=2)  # 4 of the 6 rows overlap: Dice 2/3
    target = torch.cat([moving, fixed, moving, fixed], 1)
    metric = WarpedDice()
    metric.update((torch.zeros(1, 2, 12, 12), target))
    assert metric.compute() == pytest.approx(2 / 3)
    shift = torch.zeros(1, 2, 12, 12)
    shift[:, 0] = 2.0
    metric.reset()
    metric.update((shift, target))
    assert metric.compute() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="WarpedDice needs"):
        metric.update((shift, target[:, :2]))


@pytest.mark.parametrize("name,key,kind", [("ncc", "val_ncc", WarpedNCC), ("dice", "val_dice", WarpedDice)])
def test_validation_metric_by_name(name, key, kind):
    metric = validation_metric(name, 2)
    assert list(metric) == [key] and isinstance(metric[key], kind)


def test_validation_metric_bad_name():
    with pytest.raises(ValueError, match="val_metric must be one of \\['dice', 'ncc'\\], got 'hd95'"):
        validation_metric("hd95", 2)
