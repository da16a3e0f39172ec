"""Feature networks for the sample-quality metrics: uint8 NHWC images in, :class:`~trainer.evaluation.quality.Features`
out.

- :class:`InceptionV3FID`: the FID Inception-v3 (the PyTorch port of TensorFlow's 2015-12-05 graph used by
  pytorch-fid; Heusel et al. 2017), with torchvision's parameter names so its published weights load as-is.
- :class:`TorchScriptFeatures`: any user-supplied TorchScript module.
- :class:`ClassifierFeatures`: a small CNN classifier trained here, standing in for Inception on small images
  (8x8 to 32x32 digits) where no download is possible. Its numbers are comparable only among themselves.

Each network has a ``name`` stored in reference files, so statistics from different networks are never compared.
Weights are only ever read with ``torch.load(..., weights_only=True)`` or ``torch.jit.load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.evaluation.quality import Features, QualityError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_SIZE = 299
INCEPTION_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 classes and unused slots)
SPATIAL_BLOCK = "Mixed_6d"
SPATIAL_CHANNELS = 7
"""sFID features (Nash et al. 2021, as guided-diffusion computes them): the first 7 channels of TF tensor
``mixed_6/conv``, the 1x1 branch of the graph's 7th mixed block. TF counts mixed, mixed_1.. mixed_10 for
torchvision's Mixed_5b..Mixed_7c, so that is Mixed_6d, whose output starts with that branch: 7 x 17 x 17 = 2023."""

CLASSIFIER_FORMAT = "iddpm-classifier-features"
CLASSIFIER_VERSION = 1

Progress = Callable[[int], Any]
"""Called with the number of images each batch added (``tqdm(...).update`` fits)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _why(e: BaseException) -> str:
    """An exception as a short single line, for one-line error messages."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _as_nchw_float(images: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]; grayscale repeated when the network wants ``channels`` = 3."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise QualityError(f"features: expected uint8 images [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


class FeatureNet(nn.Module):
    """A network turning a uint8 NHWC batch into ``dict(pool=[N, D], spatial=[N, S] | None, logits=[N, C] |
    None)``. ``name`` identifies the network and its weights in reference files."""

    name: str = "feature-net"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:  # pragma: no cover - interface
        raise NotImplementedError

    def extract(
        self,
        images: np.ndarray,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Features:
        """Features of all ``images`` (uint8 [N, H, W, C], or [N, H, W] grayscale), kept as float32 on the host
        (the metrics upcast to float64 block by block). Moves the network to ``device`` and to eval mode."""
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise QualityError(f"features: expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
        device = torch.device(device)
        self.to(device).eval()  # outside inference mode: moved parameters must stay ordinary tensors
        parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
        for i in range(0, images.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
            with torch.inference_mode():
                out = self(batch)
            for key, chunk in parts.items():
                if out.get(key) is not None:
                    chunk.append(out[key].float().flatten(1).cpu().numpy())
            if progress is not None:
                progress(batch.shape[0])
        arrays = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        if arrays["pool"] is None:
            raise QualityError(f"features: network {self.name} returned no pool features")
        return Features(pool=arrays["pool"], spatial=arrays["spatial"], logits=arrays["logits"])


# -- the FID Inception-v3


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The TF graph's average pools do not count padding: the FID-specific difference from torchvision.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, self.branch7x7dbl_5(d), self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs. The TF graph's last block pools with max instead of average
    (``max_pool`` = True for Mixed_7c): a quirk of that graph that FID inherits."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def default_inception_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file>`` (torch.hub's cache; TORCH_HOME defaults to ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _missing_weights_message(path: Path, explicit: bool) -> str:
    where = f"the given path {path}" if explicit else f"{path} (torch hub cache, $TORCH_HOME)"
    return (
        f"FID Inception weights not found at {where}; no download is attempted: fetch {INCEPTION_URL} on a machine "
        f"with network and copy it to {default_inception_path()}, or pass --features /path/to/{INCEPTION_FILE}"
    )


class InceptionV3FID(FeatureNet):
    """The FID Inception-v3 at 299x299: ``pool`` the 2048-d final average pool (FID, KID, P/R), ``spatial`` the
    2023-d sFID features, ``logits`` the 1008-way softmax layer without its bias (IS: Salimans et al.'s reference
    code multiplies pool_3 by the softmax weights only; torch-fidelity calls this ``logits_unbiased``).

    ``weights``: a path, or None for :func:`default_inception_path`; ``pretrained=False`` keeps random weights
    (tests). Images are resized bilinearly to 299x299 and scaled to [-1, 1], as pytorch-fid does."""

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, INCEPTION_CLASSES)
        self.name = "inception-v3-fid:untrained"
        if pretrained:
            self.load_weights(weights)
        self.eval()

    def load_weights(self, weights: str | os.PathLike | None = None) -> None:
        path = Path(weights).expanduser() if weights is not None else default_inception_path()
        if not path.is_file():
            raise QualityError(_missing_weights_message(path, explicit=weights is not None))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file: say which and why, in one line
            raise QualityError(f"FID Inception weights {path}: unreadable ({_why(e)})") from e
        self._load_checked(state, path)
        # The file's sha256 prefix names the weights; the official file's is 6726825d (in its name).
        self.name = f"inception-v3-fid:{_sha256(path)[:8]}"

    def _load_checked(self, state: Any, path: Path) -> None:
        own = self.state_dict()
        if not isinstance(state, dict):
            raise QualityError(f"FID Inception weights {path}: not a state dict")
        # Files converted from the TF graph may lack BN's num_batches_tracked (unused in eval mode).
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise QualityError(
                f"FID Inception weights {path}: not the pytorch-fid Inception state dict "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
            )
        self.load_state_dict(state, strict=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = _as_nchw_float(images, channels=3)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        spatial = None
        for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(self, block)(x)
            if block == SPATIAL_BLOCK:
                # Channels-last flattening (H, W, C), the layout of the TF tensor guided-diffusion reads.
                spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


# -- user-supplied TorchScript


class TorchScriptFeatures(FeatureNet):
    """A TorchScript module called with the uint8 NHWC batch, returning a tensor (pool features) or a dict with
    ``pool`` and optionally ``spatial`` / ``logits``. Named by the file's sha256 so references track the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        path = Path(path)
        try:
            self.module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise QualityError(f"TorchScript features {path}: cannot load ({_why(e)})") from e
        self.name = f"torchscript:{_sha256(path)[:12]}"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        out = self.module(images)
        if isinstance(out, torch.Tensor):
            return {"pool": out.flatten(1), "spatial": None, "logits": None}
        if not isinstance(out, dict) or "pool" not in out:
            raise QualityError(f"TorchScript features {self.name}: must return a tensor or a dict with 'pool'")
        return {k: (out[k].flatten(1) if out.get(k) is not None else None) for k in ("pool", "spatial", "logits")}


# -- small classifier for small images


class ClassifierFeatures(FeatureNet):
    """A small CNN classifier: two conv stages (the second's map, first ``spatial_channels`` channels pooled to
    4x4, is the spatial feature), global average pool, a ``feature_dim`` hidden layer (the pool feature) and
    the class logits. Inputs are scaled to [-1, 1]; the image size and channels are fixed at training."""

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        channels: int,
        width: int = 32,
        feature_dim: int = 128,
        spatial_channels: int = 16,
    ) -> None:
        super().__init__()
        self.meta = {
            "format": CLASSIFIER_FORMAT,
            "version": CLASSIFIER_VERSION,
            "num_classes": num_classes,
            "image_size": image_size,
            "channels": channels,
            "width": width,
            "feature_dim": feature_dim,
            "spatial_channels": spatial_channels,
        }
        w = width
        self.stage1 = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        )  # fmt: skip
        self.stage2 = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )  # fmt: skip
        self.hidden = nn.Linear(2 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def name(self) -> str:  # type: ignore[override]
        """``classifier:<sha256 of the weights, 12 hex>``: a retrained classifier gets a new name."""
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return f"classifier:{h.hexdigest()[:12]}"

    def _check(self, images: torch.Tensor) -> None:
        m = self.meta
        want = (m["image_size"], m["image_size"], m["channels"])
        if tuple(images.shape[1:]) != want:
            raise QualityError(
                f"classifier features: trained on {want[0]}x{want[1]}x{want[2]} images, got {tuple(images.shape[1:])}"
            )

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float NCHW in [-1, 1] -> (logits, pool, spatial): the training path and the feature path share it."""
        h = self.stage2(F.max_pool2d(self.stage1(x), 2))
        spatial = F.adaptive_avg_pool2d(h[:, : self.meta["spatial_channels"]], 4).flatten(1)
        pool = F.relu(self.hidden(h.mean(dim=(2, 3))))
        return self.head(pool), pool, spatial

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        self._check(images)
        logits, pool, spatial = self.logits_and_features(_as_nchw_float(images) * 2.0 - 1.0)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def save(self, path: str | os.PathLike) -> Path:
        """State dict + JSON-able meta, written atomically; loads back with ``weights_only=True``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        try:
            torch.save({"meta": dict(self.meta), "state_dict": state}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassifierFeatures:
        path = Path(path)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise QualityError(f"classifier features {path}: unreadable ({_why(e)})") from e
        if not _is_classifier_blob(blob):
            raise QualityError(f"classifier features {path}: not a classifier saved by ClassifierFeatures.save")
        meta = blob["meta"]
        if meta.get("version") != CLASSIFIER_VERSION:
            raise QualityError(f"classifier features {path}: unsupported version {meta.get('version')!r}")
        keys = ("num_classes", "image_size", "channels", "width", "feature_dim", "spatial_channels")
        net = cls(**{k: int(meta[k]) for k in keys})
        try:
            net.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise QualityError(f"classifier features {path}: weights do not fit ({_why(e)})") from e
        return net.eval()


def _is_classifier_blob(blob: Any) -> bool:
    meta = blob.get("meta") if isinstance(blob, dict) else None
    return isinstance(meta, dict) and meta.get("format") == CLASSIFIER_FORMAT


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] | None = None,
) -> ClassifierFeatures:
    """Train a :class:`ClassifierFeatures` on uint8 NHWC ``images`` (square) and integer ``labels`` with Adam and
    cross-entropy. Deterministic for a seed on CPU; the global RNG is left untouched (forked)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise QualityError(f"classifier: expected square uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape[0] != images.shape[0] or labels.min() < 0 or labels.max() >= num_classes:
        raise QualityError(f"classifier: need {images.shape[0]} labels in [0, {num_classes}), got {labels.shape}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = ClassifierFeatures(num_classes, images.shape[1], images.shape[3]).to(device)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # uint8 until batched: 4x less memory
        y = torch.from_numpy(labels.astype(np.int64)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(device)
            total, correct = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                idx = order[i : i + batch_size]
                logits, _, _ = net.logits_and_features(_as_nchw_float(x[idx]) * 2.0 - 1.0)
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.shape[0]
                correct += int((logits.argmax(1) == y[idx]).sum())
            if log is not None:
                n = x.shape[0]
                log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / n:.4f} accuracy {correct / n:.3f}")
    return net.eval()


# -- choosing a network from a command-line spec


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder (and ``constants.pkl``); ``torch.save`` archives do not.
    Looking at the zip listing decides without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def load_feature_net(spec: str = "inception", device: str | torch.device = "cpu") -> FeatureNet:
    """``inception`` (weights from the torch hub cache), ``inception:/path.pth``, or a ``.pt``/``.pth`` file:
    a TorchScript module, a classifier saved by :meth:`ClassifierFeatures.save`, or the FID Inception weights."""
    if spec == "inception":
        net: FeatureNet = InceptionV3FID()
    elif spec.startswith("inception:"):
        net = InceptionV3FID(spec.split(":", 1)[1])
    elif spec.endswith((".pt", ".pth")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise QualityError(f"feature network {path}: no such file")
        if _is_torchscript(path):
            net = TorchScriptFeatures(path)
        else:
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise QualityError(
                    f"feature network {path}: neither TorchScript nor a weights-only checkpoint ({_why(e)})"
                ) from e
            if _is_classifier_blob(blob):
                net = ClassifierFeatures.load(path)
            elif isinstance(blob, dict) and "Mixed_7c.branch_pool.conv.weight" in blob:
                net = InceptionV3FID(path)
            else:
                raise QualityError(
                    f"feature network {path}: not TorchScript, a saved classifier, or the FID Inception weights"
                )
    else:
        raise QualityError(f"feature network {spec!r}: expected 'inception', 'inception:/path.pth' or a .pt/.pth file")
    return net.to(torch.device(device)).eval()
