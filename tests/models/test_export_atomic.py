"""An encoder export that dies half-way (disk full, Ctrl-C) publishes nothing: Triton's next start
and the worker's pinned load only ever see complete versions (the ranker's export already did this;
the item and session encoders and the sequence scorer wrote straight into the version folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recstream.contracts.models import ITEM_ENCODER
from recstream.models.export import export_item_encoder
from recstream.models.ranker import ITEM_DIM
from recstream.models.repository import versions
from recstream.models.served import ItemEncoder
from recstream.models.training import CheckpointMeta


def test_an_encoder_export_that_fails_half_way_publishes_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = ItemEncoder(np.zeros((2, ITEM_DIM), np.float32), ["a", "b"], max_text_len=32)
    meta = CheckpointMeta(kind=ITEM_ENCODER, config={}, data_hash="test")
    export_item_encoder(encoder, meta, tmp_path, version=1)
    config = (tmp_path / ITEM_ENCODER / "config.pbtxt").read_text()

    real_save = ItemEncoder.save

    def disk_full_after_the_weights(self: ItemEncoder, path: Path, m: CheckpointMeta) -> Path:
        real_save(self, path, m)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ItemEncoder, "save", disk_full_after_the_weights)
    with pytest.raises(OSError, match="No space left"):
        export_item_encoder(encoder, meta.model_copy(deep=True), tmp_path, version=2)

    assert versions(tmp_path, ITEM_ENCODER) == [1]
    assert sorted(p.name for p in (tmp_path / ITEM_ENCODER).iterdir()) == ["1", "config.pbtxt"]
    assert (tmp_path / ITEM_ENCODER / "config.pbtxt").read_text() == config


def test_a_checkpoint_save_cut_short_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json carries the bundle's reuse key: written before the co-visitation file, a save cut
    short between the two was reused by the next `make train`, serving a ranker without its
    co-visitation data (or failing on a truncated file on every later run)."""
    from recstream.models.co_visitation import CoVisitation
    from recstream.models.ranker import RankerConfig, new_ranker
    from recstream.models.training import read_meta

    ranker = new_ranker(RankerConfig(seed=0))
    ranker.co_visitation = CoVisitation.fit([np.array([0, 1, 2]), np.array([1, 2])], ["a", "b", "c"])
    ranker.meta.extra["bundle_key"] = "key"

    def killed(self: CoVisitation, folder: Path) -> Path:
        (Path(folder) / self.FILE).write_bytes(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(CoVisitation, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ranker.save(tmp_path / "ranker")
    assert read_meta(tmp_path / "ranker") is None  # so the bundle trains it again


def test_the_committed_model_repository_names_no_machine_path() -> None:
    """A shipped adapter config named the venv folder of the machine that trained it (and every
    later version copied it): committed model files must not depend on where they were made."""
    from recstream.config import REPO_ROOT

    machine = ("/root/", "/home/", "/tmp/", str(REPO_ROOT))
    for path in (REPO_ROOT / "model_repo").rglob("*"):
        if path.suffix in (".json", ".pbtxt", ".txt") and path.is_file():
            text = path.read_text(errors="replace")
            assert not any(m in text for m in machine), f"{path.relative_to(REPO_ROOT)} names a machine path"
