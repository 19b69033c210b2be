"""The Lightning CheckpointIO plugin against the real Lightning Trainer and ModelCheckpoint (CPU)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.integrations.lightning import AsyncCheckpointIO  # noqa: E402
from storage_faults import faults_fixture  # noqa: E402,F401 - the `faults` fixture

STEPS_PER_EPOCH = 4


class Tiny(L.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(4 * STEPS_PER_EPOCH, 4, generator=g),
                                              torch.randn(4 * STEPS_PER_EPOCH, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


def make_trainer(plugin, ckpt_dir, max_steps, *, save_last=True, save_top_k=2, every=2, **kw):
    callback = ModelCheckpoint(dirpath=ckpt_dir, monitor="step", mode="max", save_top_k=save_top_k,
                               save_last=save_last, every_n_train_steps=every)
    kw.setdefault("devices", 1)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, plugins=[plugin], callbacks=[callback],
                     default_root_dir=os.path.dirname(ckpt_dir), **kw)


@pytest.fixture
def plugin(fast_config):
    made: list[AsyncCheckpointIO] = []

    def make(**over):
        made.append(AsyncCheckpointIO(fast_config(**over)))
        return made[-1]

    yield make
    for p in made:
        try:
            p.teardown()
        except Exception:  # noqa: BLE001 - a test that injected a failure may leave it unobserved
            pass


@pytest.fixture
def gate(faults):
    """Holds the first data file of every save (in the writer threads, or in the writer service) until
    ``gate.open()`` (opened at teardown; never > 120 s): nothing of a held save is published."""
    held = faults.gate("open_write", ".partial/rank")
    yield held
    held.open()


def visible(ckpt_dir) -> list[str]:
    return sorted(n for n in os.listdir(ckpt_dir) if n != "latest")


def hidden(ckpt_dir) -> list[str]:
    return sorted(n for n in os.listdir(ckpt_dir) if n.startswith("."))


def snapshot(trainer) -> dict:
    module = trainer.lightning_module
    return {"model": {k: v.clone() for k, v in module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "global_step": trainer.global_step}


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_fit_keeps_top_k_and_last_and_resumes_exactly(tmp_path, plugin, caplog):
    """ModelCheckpoint(save_top_k=2, save_last=True) through the plugin: after fit only the two best tags and
    last.ckpt exist (removed ones gone, no partial leftovers), each a published asyncckpt checkpoint; a fresh
    model resumed with ckpt_path="last" ends bit-identical (weights, optimizer, scheduler, step, losses) to
    an uninterrupted run, and so does one resumed from an explicit path."""
    ref_dir = str(tmp_path / "ref")
    io = plugin()
    ref = make_trainer(io, ref_dir, 8)
    ref_model = Tiny(0)
    ref.fit(ref_model)
    assert io._flatten_cache.replays >= 2  # the saves after the first matched the state instead of walking it
    assert visible(ref_dir) == ["epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    assert hidden(ref_dir) == []
    assert asyncckpt.list_tags(ref_dir) and set(asyncckpt.list_tags(ref_dir)) == set(visible(ref_dir))
    expected = snapshot(ref)

    for resume in ("last", "explicit"):
        d = str(tmp_path / resume)
        first = make_trainer(plugin(), d, 4)
        first.fit(Tiny(0))
        assert visible(d) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
        second = make_trainer(plugin(), d, 8)
        model = Tiny(seed=123)  # different initial weights: everything must come from the checkpoint
        second.fit(model, ckpt_path="last" if resume == "last" else os.path.join(d, "epoch=0-step=4.ckpt"))
        assert_same(snapshot(second), expected)
        assert model.losses == ref_model.losses[4:]
        kept = ["epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
        if resume == "explicit":  # Lightning never removes the checkpoint it resumed from
            kept.insert(0, "epoch=0-step=4.ckpt")
        assert visible(d) == kept and hidden(d) == []
    assert "did not finish" not in caplog.text  # removals are never mistaken for interrupted saves


def test_save_last_link(tmp_path, plugin, caplog):
    """save_last="link": Lightning's last.ckpt symlink loads through the plugin, resume is exact; a link
    left dangling by a run that died before its target was published loads the newest published checkpoint
    (named by `latest`) with a warning instead of failing."""
    ref_dir, d = str(tmp_path / "ref"), str(tmp_path / "link")
    ref = make_trainer(plugin(), ref_dir, 8)
    ref.fit(Tiny(0))
    first = make_trainer(plugin(), d, 4, save_last="link")
    first.fit(Tiny(0))
    assert os.path.islink(os.path.join(d, "last.ckpt"))
    second = make_trainer(plugin(), d, 8, save_last="link")
    second.fit(Tiny(7), ckpt_path="last")
    assert_same(snapshot(second), snapshot(ref))

    io = plugin()
    os.unlink(os.path.join(d, "last.ckpt"))
    os.symlink("epoch=9-step=99.ckpt", os.path.join(d, "last.ckpt"))  # never published
    with caplog.at_level(logging.WARNING, logger="asyncckpt.integrations.lightning"):
        state = io.load_checkpoint(os.path.join(d, "last.ckpt"))
    assert state["global_step"] == 8 and "never published" in caplog.text
    assert io.load_checkpoint(d)["global_step"] == 8  # a directory: the checkpoint `latest` names
    io.remove_checkpoint(os.path.join(d, "last.ckpt"))  # a link is unlinked, its target stays
    assert not os.path.lexists(os.path.join(d, "last.ckpt"))
    assert io.load_checkpoint(os.path.join(d, "epoch=1-step=8.ckpt"))["global_step"] == 8


def test_save_returns_before_durable_and_in_flight_removal(tmp_path, plugin, gate):
    """save_checkpoint returns while the writer is held: the path does not exist yet (Lightning's
    os.path.exists sees nothing half-written). remove_checkpoint of that in-flight path returns at once and
    the checkpoint is gone once the save is published; a path saved again after its removal was requested
    keeps the newer checkpoint; a published path disappears at once. The directory exists when the first
    save returns, without the leftovers of a removal a crash interrupted."""
    io = plugin(max_inflight=4)
    d = tmp_path / "c"
    (d / ".old.ckpt.removed-0f").mkdir(parents=True)  # a removal that a crash cut short
    (d / ".old.ckpt.removed-0f" / "rank00000-0.bin").write_bytes(b"x")
    a, b, c = (str(d / f"{n}.ckpt") for n in "abc")
    io.save_checkpoint({"w": torch.ones(3), "n": 1}, a)
    assert not (d / ".old.ckpt.removed-0f").exists()
    assert os.path.isdir(d)  # at once: Lightning's save_last="link" symlinks into it right after the call
    io.save_checkpoint({"w": torch.ones(3), "n": 2}, b)
    assert not os.path.exists(a) and not os.path.exists(b)
    io.remove_checkpoint(a)  # in flight: removed once published
    io.remove_checkpoint(b)
    io.save_checkpoint({"w": torch.zeros(3), "n": 3}, b)  # saved again: the newer one must survive
    io.save_checkpoint({"w": torch.ones(3), "n": 4}, c)
    assert gate.entered.wait(30)  # a save is held at the gate, not lost before it
    gate.open()
    io.wait(timeout=60)
    assert not os.path.lexists(a)
    assert io.load_checkpoint(b)["n"] == 3
    io.remove_checkpoint(c)  # published: gone when the call returns
    assert not os.path.lexists(c)
    io.teardown()
    assert visible(str(d)) == ["b.ckpt"] and hidden(str(d)) == []


def test_background_failure_surfaces_in_training_loop(tmp_path, plugin, faults):
    """A save that fails in the background (a full disk while writing epoch=0-step=4.ckpt, after step=2 and its
    last.ckpt were published) is raised inside fit (by the next save or by teardown), the tag it was writing
    never appears, and the checkpoint before it still loads."""
    d = str(tmp_path / "f")
    faults.fail("open_write", os.path.join(d, ".epoch=0-step=4.ckpt.partial", ""),
                OSError(28, "No space left on device"))
    trainer = make_trainer(plugin(), d, 8)
    with pytest.raises(asyncckpt.WriteError, match="No space left"):
        trainer.fit(Tiny(0))
    assert not os.path.lexists(os.path.join(d, "epoch=0-step=4.ckpt"))
    assert AsyncCheckpointIO().load_checkpoint(os.path.join(d, "epoch=0-step=2.ckpt"))["global_step"] == 2


def test_teardown_drains(tmp_path, plugin, gate):
    """teardown blocks until every save in flight is published."""
    io = plugin()
    p = str(tmp_path / "t" / "x.ckpt")
    io.save_checkpoint({"w": torch.arange(5.0)}, p)
    assert not os.path.exists(p)
    assert gate.entered.wait(30)
    gate.open()
    io.teardown()
    assert os.path.isdir(p) and torch.equal(io.load_checkpoint(p)["w"], torch.arange(5.0))


def test_bad_input_is_named(tmp_path, plugin):
    """Names outside the tag grammar, remote URLs, keep_last and storage_options are refused clearly."""
    io = plugin()
    with pytest.raises(asyncckpt.InvalidTagError, match="epoch 0"):
        io.save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "epoch 0.ckpt"))
    with pytest.raises(asyncckpt.CheckpointError, match="s3://b/x.ckpt"):
        io.save_checkpoint({"w": torch.ones(1)}, "s3://b/x.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "x.ckpt"), storage_options={})
    with pytest.raises(asyncckpt.ConfigError, match="keep_last"):
        AsyncCheckpointIO({"keep_last": 2})
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        io.load_checkpoint(str(tmp_path / "missing.ckpt"))


def test_loads_a_torch_save_checkpoint(tmp_path, plugin):
    """A run switched to the plugin still resumes from the torch.save .ckpt files of its earlier runs."""
    path = str(tmp_path / "old.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert plugin().load_checkpoint(path, weights_only=True)["global_step"] == 3


@pytest.mark.timeout(300)
def test_ddp_two_ranks(tmp_path, fast_config):
    """Two gloo ranks (ddp_spawn on CPU): Lightning hands the checkpoint to the plugin on global rank 0 only,
    which writes the whole replicated state as a one-rank checkpoint (no collective the other rank would have
    to join); both ranks resume from it and end identical to the uninterrupted 2-rank run."""
    def run(d, ckpt_path=None):
        trainer = make_trainer(AsyncCheckpointIO(fast_config()), d, 8, save_top_k=-1, strategy="ddp_spawn", devices=2)
        trainer.fit(Tiny(0 if ckpt_path is None else 5), ckpt_path=ckpt_path)
        return trainer.lightning_module.state_dict()

    ref_dir = str(tmp_path / "ref")
    ref = run(ref_dir)
    names = [f"epoch={e}-step={s}.ckpt" for e, s in ((0, 2), (1, 4), (2, 6), (3, 8))]  # 2 batches per rank
    assert visible(ref_dir) == names + ["last.ckpt"] and hidden(ref_dir) == []
    assert asyncckpt.CheckpointReader(ref_dir, "last.ckpt").manifest["world_size"] == 1
    assert_same(run(str(tmp_path / "resumed"), ckpt_path=os.path.join(ref_dir, names[1])), ref)


def test_config_reaches_the_engine_unchanged(tmp_path, fast_config):
    """Every configuration key but `overwrite` (always on) reaches the plugin's engine as given, also through
    the pickling of ddp_spawn: a key added to Config later (e.g. a snapshot mode) needs no plugin change to
    travel."""
    import dataclasses
    import pickle

    cfg = fast_config(max_inflight=3, on_busy="skip", commit_timeout_s=77, verify_on_load=False,
                      allow_pickle=True, pin_memory="never", codec={"level": 5})
    io = AsyncCheckpointIO(cfg)
    want = dataclasses.replace(cfg, overwrite=True)
    assert io.config == want and pickle.loads(pickle.dumps(io)).config == want
    io.save_checkpoint({"w": torch.ones(2)}, str(tmp_path / "a.ckpt"))
    assert io._engine.config is io.config
    io.teardown()
