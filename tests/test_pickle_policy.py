"""Pickle policy: objects JSON cannot represent need ``allow_pickle`` at save and at load. Without it, save
fails at once naming the key path, and load refuses pickled entries without running any of their code."""
from __future__ import annotations

import fractions
import os

import pytest
import torch

import asyncckpt
import asyncckpt.format as fmt
from asyncckpt import CorruptCheckpointError, PickleNotAllowedError, UnsafeCheckpointError
from asyncckpt.owners import restamp
from reliability import record

pytestmark = pytest.mark.timeout(60)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def _touch(path):  # what unpickling a Payload runs
    with open(path, "w") as f:
        f.write("pwned")
    return "unpickled"


class Payload:
    """Unpickling this object creates ``path``: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


@pytest.mark.parametrize("client_state, path", [
    ({"obj": object()}, "client_state/obj"),
    ({"a": {"b": [1, 2, {1, 2}]}}, "client_state/a/b/2"),
    ({"cfg": {"frac": fractions.Fraction(1, 3)}}, "client_state/cfg/frac"),
    ({"sl/ash": Point(1, 2)}, "client_state/sl~1ash"),
    ({"t": (1, range(3))}, "client_state/t/1"),
])
def test_save_refuses_non_json_at_once_naming_the_key_path(client_state, path, save_dir, make_trainer, make_saver):
    saver = make_saver(make_trainer())
    with pytest.raises(PickleNotAllowedError) as ei:
        saver.save_checkpoint(save_dir, tag="x", client_state=client_state)
    assert repr(path) in str(ei.value) and "allow_pickle" in str(ei.value)
    assert isinstance(ei.value, TypeError)
    assert not os.path.exists(save_dir) or os.listdir(save_dir) == []  # nothing was started
    assert saver.save_checkpoint(save_dir, tag="x").result(timeout=30).tag == "x"


def test_functional_save_refuses_non_json(save_dir, fast_config):
    with pytest.raises(PickleNotAllowedError, match="'outer/0/inner'"):
        asyncckpt.save({"outer": [{"inner": Point(0, 0)}]}, save_dir, "t", config=fast_config())
    with pytest.raises(PickleNotAllowedError, match="<root>"):
        asyncckpt.save(Point(0, 0), save_dir, "t", config=fast_config())
    assert asyncckpt.list_tags(save_dir) == []


def test_allow_pickle_round_trips(save_dir, make_trainer, make_saver):
    t = make_trainer()
    saver = make_saver(t, allow_pickle=True)
    cs = {"point": Point(3, 4), "set": {1, 2, 3}, "frac": fractions.Fraction(2, 7), "nested": [Point(0, 1)],
          "w": torch.ones(2)}
    saver.save_checkpoint(save_dir, client_state=cs).result(timeout=30)
    _, out = saver.load_checkpoint(save_dir)
    assert out["point"] == Point(3, 4) and out["set"] == {1, 2, 3} and out["frac"] == fractions.Fraction(2, 7)
    assert out["nested"] == [Point(0, 1)] and torch.equal(out["w"], torch.ones(2))
    state = asyncckpt.load(save_dir, allow_pickle=True)
    assert state["client_state"]["point"] == Point(3, 4)


def test_tensors_are_never_pickled(save_dir, fast_config):
    """Even with allow_pickle, tensors go to data files and the skeleton holds only references."""
    asyncckpt.save({"w": torch.randn(4), "p": Point(1, 1)}, save_dir, "t",
                   config=fast_config(allow_pickle=True)).result(timeout=30)
    skeleton = asyncckpt.CheckpointReader(save_dir, "t").skeleton()
    assert skeleton["w"] == {"__t": "tensor", "key": "w"} and skeleton["p"]["__t"] == "pickle"


def _forge_pickle_node(save_dir: str, tag: str, source: str, source_tag: str, key: str) -> None:
    """Copy the pickle node of ``key`` from the index of ``source``/``source_tag`` into the index of
    ``save_dir``/``tag`` (saved without pickle), re-sealed and re-checksummed so only the pickle policy stops it."""
    index_name = fmt.rank_index_name(0)
    with open(os.path.join(save_dir, tag, index_name), "rb") as f:
        index = fmt.unseal(f.read(), "index")
    with open(os.path.join(source, source_tag, index_name), "rb") as f:
        index["skeleton"][key] = fmt.unseal(f.read(), "index")["skeleton"][key]
    data = fmt.seal(index)
    with open(os.path.join(save_dir, tag, index_name), "wb") as f:
        f.write(data)
    restamp(os.path.join(save_dir, tag))


def test_load_refuses_pickled_entries_without_running_code(tmp_path, save_dir, make_trainer, make_saver, fast_config):
    """Every way of reading a checkpoint (load, CheckpointReader.load_state, load_checkpoint) refuses a pickled
    entry without allow_pickle, naming its key path, and never runs its code; so does a pickle node forged
    into a checkpoint saved without pickle. With allow_pickle the same payload does run."""
    marker = str(tmp_path / "marker")
    cases = held = 0
    try:
        asyncckpt.save({"w": torch.ones(3), "cfg": {"evil": Payload(marker)}}, save_dir, "t",
                       config=fast_config(allow_pickle=True)).result(timeout=30)
        assert not os.path.exists(marker)  # pickling ran nothing either

        cases += 1
        with pytest.raises(UnsafeCheckpointError) as ei:
            asyncckpt.load(save_dir, "t")
        assert "'cfg/evil'" in str(ei.value) and "allow_pickle" in str(ei.value)
        assert isinstance(ei.value, CorruptCheckpointError)
        assert not os.path.exists(marker)
        held += 1

        cases += 1
        with pytest.raises(UnsafeCheckpointError, match="'cfg/evil'"):
            asyncckpt.CheckpointReader(save_dir, "t").load_state()
        assert not os.path.exists(marker)
        held += 1

        # AsyncCheckpointer with the default config refuses too, and leaves the model untouched
        cases += 1
        t = make_trainer()
        saver = make_saver(t, allow_pickle=True)
        saver.save_checkpoint(save_dir, tag="ckpt", client_state={"evil": Payload(marker)}).result(timeout=30)
        fresh = make_trainer(seed=4)
        before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
        with pytest.raises(UnsafeCheckpointError, match="'client_state/evil'"):
            make_saver(fresh).load_checkpoint(save_dir, tag="ckpt")
        assert not os.path.exists(marker)
        assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in before.items())
        held += 1

        # a pickle node forged into a checkpoint saved without pickle is refused the same way
        cases += 1
        plain = str(tmp_path / "plain")
        asyncckpt.save({"w": torch.ones(3), "cfg": {}}, plain, "q", config=fast_config()).result(timeout=30)
        _forge_pickle_node(plain, "q", save_dir, "t", "cfg")
        with pytest.raises(UnsafeCheckpointError, match="'cfg/evil'"):
            asyncckpt.load(plain, "q")
        assert not os.path.exists(marker)
        held += 1

        # the payload is real: with allow_pickle the code does run (so the checks above mean something)
        assert asyncckpt.load(save_dir, "t", allow_pickle=True)["cfg"]["evil"] == "unpickled"
        assert os.path.exists(marker)
    finally:
        record("Forged input", "pickle payload that creates a file (refused, never run)", cases, held,
               note="load, CheckpointReader, load_checkpoint, and a pickle node forged into a plain checkpoint")


def test_pickle_needs_allow_pickle_on_both_sides(save_dir, fast_config):
    """Saved without allow_pickle nothing is pickled; loading with allow_pickle then changes nothing."""
    state = {"a": (1, 2), "b": {3: "x"}, "c": b"raw", "d": torch.bfloat16}
    asyncckpt.save(state, save_dir, "t", config=fast_config()).result(timeout=30)
    assert asyncckpt.load(save_dir, "t", allow_pickle=True) == state
    assert asyncckpt.load(save_dir, "t") == state
