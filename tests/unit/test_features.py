"""Feature networks: the FID Inception's parameter table, TorchScript and classifier round trips, spec loading."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from trainer.evaluation.features import (
    ClassifierFeatures,
    FeatureNet,
    InceptionV3FID,
    TorchScriptFeatures,
    load_feature_net,
    train_classifier,
)
from trainer.evaluation.quality import Features, QualityError


def _inception_table() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of pytorch-fid's FID Inception (torchvision names, aux logits off, 1008 classes),
    written out from the architecture rather than from trainer.evaluation.features: (name, in, out, kernel h,
    kernel w)."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for block, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [
            (f"{block}.branch1x1", cin, 64, 1, 1),
            (f"{block}.branch5x5_1", cin, 48, 1, 1),
            (f"{block}.branch5x5_2", 48, 64, 5, 5),
            (f"{block}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{block}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{block}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{block}.branch_pool", cin, pool, 1, 1),
        ]
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [
            (f"{block}.branch1x1", 768, 192, 1, 1),
            (f"{block}.branch7x7_1", 768, c7, 1, 1),
            (f"{block}.branch7x7_2", c7, c7, 1, 7),
            (f"{block}.branch7x7_3", c7, 192, 7, 1),
            (f"{block}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{block}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{block}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{block}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{block}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{block}.branch_pool", 768, 192, 1, 1),
        ]
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [
            (f"{block}.branch1x1", cin, 320, 1, 1),
            (f"{block}.branch3x3_1", cin, 384, 1, 1),
            (f"{block}.branch3x3_2a", 384, 384, 1, 3),
            (f"{block}.branch3x3_2b", 384, 384, 3, 1),
            (f"{block}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{block}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{block}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{block}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{block}.branch_pool", cin, 192, 1, 1),
        ]
    table: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, kh, kw in convs:
        table[f"{name}.conv.weight"] = (cout, cin, kh, kw)  # no conv bias: batch norm follows
        for p in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.bn.{p}"] = (cout,)
    table["fc.weight"] = (1008, 2048)
    table["fc.bias"] = (1008,)
    return table


@pytest.fixture(scope="module")
def inception() -> InceptionV3FID:
    torch.manual_seed(0)
    return InceptionV3FID(pretrained=False)


@pytest.fixture(scope="module")
def inception_weights(inception: InceptionV3FID, tmp_path_factory: pytest.TempPathFactory):
    """A stand-in for the published file: same keys and shapes, no num_batches_tracked (as converted from TF)."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def test_inception_state_dict_matches_pytorch_fid_table(inception: InceptionV3FID) -> None:
    got = {k: tuple(v.shape) for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    want = _inception_table()
    assert sorted(set(got) ^ set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert got["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert got["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    # torchvision's inception_v3 has 27,161,264 parameters; without aux logits (3,326,696) and with a
    # 1008-way instead of 1000-way fc (+16,392) that is 23,850,960.
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    bns = [m for m in inception.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 and m.affine for m in bns)


def test_inception_forward_shapes(inception: InceptionV3FID) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)  # grayscale, resized
    feats = inception.extract(images, batch_size=2)
    assert feats.pool.shape == (2, 2048) and feats.spatial.shape == (2, 7 * 17 * 17) and feats.logits.shape == (2, 1008)
    assert feats.pool.dtype == np.float32 and np.isfinite(feats.pool).all()
    assert (feats.pool >= 0).all()  # average of ReLU outputs
    np.testing.assert_allclose(feats.logits, feats.pool @ inception.fc.weight.detach().numpy().T, rtol=1e-4, atol=1e-4)


def test_inception_weights_load_by_path_and_spec(inception: InceptionV3FID, inception_weights) -> None:
    sha8 = hashlib.sha256(inception_weights.read_bytes()).hexdigest()[:8]
    net = load_feature_net(f"inception:{inception_weights}")
    assert isinstance(net, InceptionV3FID) and net.name == f"inception-v3-fid:{sha8}"
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)
    assert isinstance(load_feature_net(str(inception_weights)), InceptionV3FID)  # a bare .pth of the weights


def test_inception_refuses_a_foreign_state_dict(tmp_path) -> None:
    path = tmp_path / "foreign.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(QualityError) as e:
        InceptionV3FID(path)
    assert "foreign.pth" in str(e.value) and "\n" not in str(e.value)


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = x.float().mean(dim=(1, 2))  # [N, C]
        return {"pool": f, "logits": torch.cat([f, -f], 1)}


class _TinyTensor(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)[:, :5]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # deprecated in torch 2.x, still supported
def test_torchscript_round_trip(tmp_path) -> None:
    path = tmp_path / "feat.pt"
    torch.jit.script(_Tiny()).save(str(path))
    net = load_feature_net(str(path))
    assert isinstance(net, TorchScriptFeatures)
    assert net.name == "torchscript:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    images = np.random.default_rng(1).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    feats = net.extract(images, batch_size=2)
    want = images.astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(feats.pool, want, rtol=1e-6)
    assert feats.spatial is None and feats.logits.shape == (5, 6)

    path2 = tmp_path / "feat_tensor.pth"
    torch.jit.script(_TinyTensor()).save(str(path2))
    feats2 = load_feature_net(str(path2)).extract(images, batch_size=3)
    assert feats2.pool.shape == (5, 5) and feats2.logits is None


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four separable classes of 8x8 grayscale images: a bright quadrant each, on noise."""
    r = np.random.default_rng(seed)
    labels = r.integers(0, 4, n)
    images = r.integers(0, 80, size=(n, 8, 8, 1))
    for i, y in enumerate(labels):
        top, left = divmod(int(y), 2)
        images[i, 4 * top : 4 * top + 4, 4 * left : 4 * left + 4] += 150
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def classifier() -> ClassifierFeatures:
    images, labels = _digits(512, 0)
    return train_classifier(images, labels, num_classes=4, epochs=3, seed=0)


def test_classifier_learns_separable_data(classifier: ClassifierFeatures) -> None:
    images, labels = _digits(256, 1)
    feats = classifier.extract(images, batch_size=64)
    assert (feats.logits.argmax(1) == labels).mean() > 0.95
    assert feats.pool.shape == (256, 128) and feats.spatial.shape == (256, 16 * 4 * 4)
    assert classifier.name.startswith("classifier:") and len(classifier.name) == len("classifier:") + 12


def test_classifier_training_is_deterministic_and_leaves_global_rng() -> None:
    images, labels = _digits(64, 2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_classifier(images, labels, num_classes=4, epochs=1, seed=5)
    assert torch.equal(torch.rand(1), before)
    b = train_classifier(images, labels, num_classes=4, epochs=1, seed=5)
    assert a.name == b.name


def test_classifier_save_load_round_trip(classifier: ClassifierFeatures, tmp_path) -> None:
    path = classifier.save(tmp_path / "clf.pt")
    loaded = load_feature_net(str(path))
    assert isinstance(loaded, ClassifierFeatures) and loaded.name == classifier.name
    images, _ = _digits(10, 3)
    a, b = classifier.extract(images), loaded.extract(images)
    np.testing.assert_array_equal(a.pool, b.pool)
    np.testing.assert_array_equal(a.spatial, b.spatial)
    with pytest.raises(QualityError, match="trained on 8x8x1"):
        loaded.extract(np.zeros((2, 16, 16, 1), dtype=np.uint8))


class _Evil:
    def __reduce__(self):  # unpickling this would run code: weights_only loading must refuse it
        return (print, ("unpickled!",))


def test_load_feature_net_refuses_bad_specs(tmp_path) -> None:
    with pytest.raises(QualityError):
        load_feature_net("resnet")
    with pytest.raises(QualityError, match="no such file"):
        load_feature_net(str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(QualityError, match="junk.pt"):
        load_feature_net(str(junk))
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(QualityError, match="evil.pt"):
        load_feature_net(str(evil))
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(QualityError, match="not TorchScript"):
        load_feature_net(str(plain))


def test_feature_net_extract_validates_input() -> None:
    net = ClassifierFeatures(num_classes=2, image_size=8, channels=1)
    with pytest.raises(QualityError):
        net.extract(np.zeros((2, 8, 8, 1), dtype=np.float32))
    feats = net.extract(np.zeros((3, 8, 8), dtype=np.uint8))  # [N, H, W] grayscale gains its channel axis
    assert isinstance(feats, Features) and isinstance(net, FeatureNet) and len(feats) == 3
    assert not any(p.is_inference() for p in net.parameters())  # extract leaves the weights trainable/loadable
    net.load_state_dict(ClassifierFeatures(num_classes=2, image_size=8, channels=1).state_dict())
