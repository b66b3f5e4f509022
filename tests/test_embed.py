"""`python -m usf_mae_jax.embed`: one embedding per record, from benchmark dirs and from shard folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_prep import synthetic, writer
from data_prep.benchmarks import convert, mock
from usf_mae_jax import embed
from usf_mae_jax.models import vit
from usf_mae_jax.torch_reference import build_reference_mae

ARCH = dict(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2, decoder_width=32,
            decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module")
def reference_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = build_reference_mae(**ARCH, norm_pix_loss=False).eval()
    with torch.no_grad():  # move LayerNorm weights off 1/0 so a missing `norm` would show
        for name, param in model.named_parameters():
            if "pos_embed" not in name:
                param.add_(torch.randn_like(param) * 0.05)
    path = str(tmp_path_factory.mktemp("init") / "mae.pth")
    torch.save({"model": model.state_dict()}, path)
    return model, path


def torch_cls_feature(model, image: np.ndarray) -> np.ndarray:
    """The reference's cls token after `norm` for one uint8 (H, W, 1) image, preprocessed as we do."""
    x = np.repeat(image.astype(np.float32) / 255.0, 3, axis=-1)
    x = (x - np.array(vit.IMAGENET_MEAN, np.float32)) / np.array(vit.IMAGENET_STD, np.float32)
    with torch.no_grad():
        return model.forward_features(torch.tensor(x).permute(2, 0, 1)[None])[0, 0].numpy()


def test_benchmark_dir_gives_every_record_once_with_source_and_label(reference_pth, tmp_path):
    model, path = reference_pth
    mock.write_busbra_tree(str(tmp_path / "raw"), patients=12, size=32, seed=2)
    convert("busbra", str(tmp_path / "raw"), str(tmp_path / "out"))
    out = str(tmp_path / "features.npz")
    summary = embed.embed(path, str(tmp_path / "out"), out, batch_size=8)
    saved = np.load(out)
    images = sorted(os.listdir(tmp_path / "raw" / "BUSBRA" / "Images"))
    assert summary == {"count": len(images), "dim": 32, "pool": "cls", "img_size": 32}
    assert sorted(saved["source"].tolist()) == [f"Images/{name}" for name in images]
    assert saved["embeddings"].shape == (len(images), 32) and saved["embeddings"].dtype == np.float32
    rows = {}
    with open(tmp_path / "raw" / "BUSBRA" / "bus_data.csv") as f:
        next(f)
        for line in f:
            fields = line.split(",")
            rows[f"Images/{fields[0]}.png"] = (1 if fields[3] == "malignant" else 0, fields[1])
    assert saved["label"].tolist() == [rows[s][0] for s in saved["source"]]
    assert saved["subject"].tolist() == [rows[s][1] for s in saved["source"]]
    assert set(saved["split"].tolist()) == {f"fold{k}" for k in range(1, 6)}
    assert set(saved["dataset"].tolist()) == {"busbra"}
    first = os.path.join(tmp_path, "raw", "BUSBRA", saved["source"][0])
    import cv2

    image = cv2.imread(first, cv2.IMREAD_GRAYSCALE)[:, :, None]
    np.testing.assert_allclose(saved["embeddings"][0], torch_cls_feature(model, image), atol=2e-5)


def test_shard_folders_and_mean_pool(reference_pth, tmp_path):
    _, path = reference_pth
    tasks = synthetic.make_tasks(10, 32, seed=0, lesion_fraction=1.0, val_fraction=0.2)
    manifest = writer.write_dataset(str(tmp_path / "shards"), "synth", tasks, synthetic.load, max_side=0,
                                    progress=False)
    out = str(tmp_path / "f.npz")
    summary = embed.embed(path, str(tmp_path / "shards"), out, pool="mean", img_size=48, batch_size=4)
    saved = np.load(out)
    assert summary == {"count": 10, "dim": 32, "pool": "mean", "img_size": 48}
    assert sorted(saved["split"].tolist()) == ["train"] * 8 + ["val"] * 2 == sorted(
        s for s, n in manifest["counts"].items() for _ in range(n))
    assert set(saved["label"].tolist()) <= {0, 1} and set(saved["dataset"].tolist()) == {"synth"}
    assert len(set(saved["id"].tolist())) == 10
    np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1) > 0, True)


def test_bad_data_dirs_fail_with_the_path(reference_pth, tmp_path):
    _, path = reference_pth
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        embed.embed(path, str(tmp_path / "nowhere"), str(tmp_path / "x.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a converted benchmark"):
        embed.embed(path, str(tmp_path / "empty"), str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="--batch_size must be positive"):
        embed.embed(path, str(tmp_path / "empty"), str(tmp_path / "x.npz"), batch_size=0)


def test_command_line_prints_a_json_summary(reference_pth, tmp_path, python_runner):
    _, path = reference_pth
    tasks = synthetic.make_tasks(3, 32, seed=0, lesion_fraction=1.0, val_fraction=0.0)
    writer.write_dataset(str(tmp_path / "shards"), "synth", tasks, synthetic.load, max_side=0, progress=False)
    out = python_runner(f"""
        import sys
        from absl import app
        from usf_mae_jax import embed
        sys.argv = ["embed", "--init={path}", "--data_dir={tmp_path}/shards/synth", "--out={tmp_path}/e.npz"]
        try:
            app.run(embed.main)
        except SystemExit as e:
            assert not e.code, e.code
        """)
    assert json.loads(out.strip().splitlines()[-1]) == {"out": f"{tmp_path}/e.npz", "count": 3, "dim": 32,
                                                         "pool": "cls", "img_size": 32}


def torch_block_average(model, image: np.ndarray) -> np.ndarray:
    """Every block's mean patch token of the reference encoder, averaged over the blocks (before `norm`)."""
    x = np.repeat(image.astype(np.float32) / 255.0, 3, axis=-1)
    x = (x - np.array(vit.IMAGENET_MEAN, np.float32)) / np.array(vit.IMAGENET_STD, np.float32)
    with torch.no_grad():
        imgs = torch.tensor(x).permute(2, 0, 1)[None]
        tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        h = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(1, -1, -1), tokens], dim=1)
        means = []
        for block in model.blocks:
            h = block(h)
            means.append(h[:, 1:].mean(dim=1))
        return torch.stack(means).mean(dim=0)[0].numpy()


def test_blocks_pool_is_the_reference_encoders_block_average(reference_pth, tmp_path):
    model, path = reference_pth
    tasks = synthetic.make_tasks(4, 32, seed=1, lesion_fraction=1.0, val_fraction=0.0)
    writer.write_dataset(str(tmp_path / "shards"), "synth", tasks, synthetic.load, max_side=0, progress=False)
    out = str(tmp_path / "b.npz")
    assert embed.embed(path, str(tmp_path / "shards"), out, pool="blocks", batch_size=4)["pool"] == "blocks"
    saved = np.load(out)
    images = {}
    for task in tasks:
        for example in synthetic.load(task):
            images[example.source] = example.image
    for source, feature in zip(saved["source"], saved["embeddings"]):
        image = images[str(source)]
        np.testing.assert_allclose(feature, torch_block_average(model, image.reshape(32, 32, 1)), atol=2e-5)
