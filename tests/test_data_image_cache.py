"""TaskDataset's image cache (`data.cache_images`): each image is decoded once, and the examples are the same."""
import torch
from PIL import Image

import mage.data.dataset as dataset_module
from mage.data.dataset import TaskDataset
from mage.data.images import ImageConfig
from mage.data.readers import Record

CFG = ImageConfig.tiny()


def _records(tmp_path):
    out = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (CFG.size, CFG.size), (40 * i, 200 - 50 * i, 90)).save(path)
        out.append(Record("vqav2", f"vqav2/{i}", [("What color is the circle?", "red")], image=str(path)))
    return out


def test_cached_dataset_decodes_each_image_once_and_gives_the_same_examples(tmp_path, monkeypatch):
    records = _records(tmp_path)
    loads = []
    real_load = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda p: loads.append(p) or real_load(p))
    plain, cached = TaskDataset(records, CFG), TaskDataset(records, CFG, cache_images=True)
    for epoch in range(3):
        for i in range(len(records)):
            a, b = plain[i], cached[i]
            assert torch.equal(a.views, b.views) and torch.equal(a.positions, b.positions)
            assert a.turns == b.turns and a.example_id == b.example_id
    # the plain dataset decodes on every access (9), the cached one once per record (3)
    assert len(loads) == 9 + 3
    assert not torch.equal(cached[0].views, cached[1].views)
