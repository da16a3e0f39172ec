"""The measurements and reports of ``bench/experiments/run.py``: loss curves from MLflow, bits/dim, sample quality,
aggregation over seeds, plots, the markdown with the comparison to the paper, and the MLflow summary runs."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 0.25
"""The loss-noise figures use the last quarter of the logged points (each a mean over train.log_every steps)."""
CURVES = {1: ["mse", "vb"], 2: ["mse", "vb"], 3: ["loss", "vb"], 4: ["loss", "vb"]}
"""Training metrics plotted per experiment (``train/<name>`` in MLflow; vb and mse are unbiased estimates of their
uniform-t means whatever the timestep sampler; loss is the importance-weighted loss that was minimised)."""
TITLES = {
    1: "L_simple with fixed variances vs L_hybrid with learned variances",
    2: "Linear vs cosine noise schedule (L_hybrid)",
    3: "L_vlb: uniform vs loss-second-moment timestep sampling",
    4: "L_hybrid: uniform vs importance sampling fed L_vlb vs fed the whole loss",
    5: "Sample quality and likelihood against sampling steps",
}
CLAIMS = {
    1: "L_hybrid with learned variances reaches a better log-likelihood (lower bits/dim) than L_simple with "
    "fixed variances (Nichol & Dhariwal 2021, §3.1)",
    2: "the cosine schedule gives a better log-likelihood than the linear one, especially at low resolution (§3.2)",
    3: "importance sampling makes the L_vlb learning curve far less noisy and lets it reach a lower loss "
    "(§3.3, Fig. 6)",
    4: "importance sampling helps L_vlb but brings no gain with the less noisy L_hybrid (§3.3)",
    5: "with learned variances, respaced ancestral sampling keeps near full-step quality at 50-100 steps, where "
    "fixed variances degrade much more (§4, Fig. 8)",
}
STAND_IN = (
    "FID here is not Inception-FID: the Inception-v3 weights cannot be downloaded on this machine and a network "
    "trained on ImageNet photos says little about 16x16 digits. It is the Fréchet distance in the 128-d hidden "
    "layer of a small CNN classifier trained by the script on the digits train split (`trainer.evaluation.features."
    "train_classifier`), against the train split's statistics; its numbers compare only with each other (same "
    "classifier, same sample count). Class coverage (classes holding >= 5% of the samples by the classifier's "
    "prediction, and the entropy of the predicted-class histogram / log 10) stands in for the diversity that "
    "Inception features capture; `confident` is the share of samples the classifier gives >= 0.9 probability."
)


def fmt_time(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# ------------------------------------------------------------------------------------------ data and scoring


def read_split(root: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The split's images (uint8 NHWC, manifest order) and labels."""
    import torch

    from trainer.config import DataConfig
    from trainer.data import load_manifest, read_ranges, split_size

    cfg = DataConfig(root=str(root), batch_size=256, num_workers=0, pin_memory=False, random_flip=False)
    info = load_manifest(str(root))
    n = split_size(cfg, info, split)
    n = min(n, limit) if limit is not None else n
    images = np.zeros((n, info.image_size, info.image_size, info.channels), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    for x, y, pos in read_ranges(cfg, info, split, [(0, n)]):
        # The stream maps uint8 v to v/127.5 - 1; this inverts it exactly (as evaluate.py stats does).
        images[pos.numpy()] = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        labels[pos.numpy()] = y.numpy()
    keep = labels >= 0
    return images[keep], labels[keep]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def score_samples(d: Path, clf: Path, ref: Path) -> dict[str, Any]:
    """``evaluate.py quality`` of ``d/samples.npz`` against ``ref`` in the classifier's feature space, plus class
    coverage from its predictions; ``d/quality.json`` is written last (it marks the set as done)."""
    from scipy import special

    from trainer.evaluation import scoring
    from trainer.evaluation.features import load_feature_net

    raw = d / "quality_raw.json"
    argv = [str(d), "--ref", str(ref), "--features", str(clf), "--device", "cpu", "--no-mlflow", "--out", str(raw)]
    if scoring.main("quality", argv) != 0:
        raise RuntimeError(f"evaluate.py quality failed on {d}")
    with np.load(d / "samples.npz", allow_pickle=False) as z:
        images = z["arr_0"]
    logits = load_feature_net(str(clf), "cpu").extract(images, batch_size=256).logits
    probs = special.softmax(np.asarray(logits, dtype=np.float64), axis=1)
    hist = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
    nz = hist[hist > 0]
    result = {
        **json.loads(raw.read_text()),
        "class_histogram": hist.tolist(),
        "coverage_5pct": float((hist >= 0.05).mean()),
        "class_entropy": float(-(nz * np.log(nz)).sum() / math.log(len(hist))),
        "confident": float((probs.max(1) >= 0.9).mean()),
    }
    _write_json(d / "quality.json", result)
    return result


def score_real(d: Path, data: Path, n: int, clf: Path, ref: Path) -> dict[str, Any]:
    """The same metrics for the first ``n`` held-out (val) images: the floor of FID at this sample count."""
    if (d / "quality.json").is_file():
        return json.loads((d / "quality.json").read_text())
    images, _ = read_split(data, "val", n)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "samples.npz", "wb") as f:
        np.savez(f, arr_0=images)
    return score_samples(d, clf, ref)


def respaced_bpd(export: Path, data: Path, n: int, steps: list[int], batch: int) -> dict[str, Any]:
    """The variational bound of the respaced process with K steps (ddpm spacing, the sampler's) for each K in
    ``steps``: K network calls per image, on the first ``n`` val images, parts of ``batch`` with noise seeded per
    part as ``evaluate.py bpd`` seeds it (seed 0)."""
    import torch

    from trainer.diffusion import create_diffusion
    from trainer.evaluation.inference import load_for_inference
    from trainer.evaluation.parts import part_seed, split_range

    cfg, model, meta = load_for_inference(str(export), True, None, torch.device("cpu"))
    images, labels = read_split(data, "val", n)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    d = cfg.diffusion
    out: dict[str, Any] = {"export": str(export), "num_images": len(images), "by_steps": {}}
    for k in steps:
        diff = create_diffusion(d.steps, d.schedule, d.mean_type, d.var_type, d.loss, d.vlb_weight, respacing=str(k))
        totals, priors = [], []
        for part, (lo, hi) in enumerate(split_range(len(images), batch)):
            kwargs = {"y": torch.from_numpy(labels[lo:hi])} if meta.get("num_classes") else {}
            gen = torch.Generator().manual_seed(part_seed(0, part))
            res = diff.calc_bpd_loop(model, x_all[lo:hi], model_kwargs=kwargs, clip_denoised=True, generator=gen)
            totals.append(res["total_bpd"].double().numpy())
            priors.append(res["prior_bpd"].double().numpy())
        bpd = np.concatenate(totals)
        out["by_steps"][str(k)] = {
            "bits_per_dim": float(bpd.mean()),
            "bits_per_dim_stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan"),
            "prior_bpd": float(np.concatenate(priors).mean()),
            "per_image_bpd": bpd.tolist(),  # for the paired intervals between arms (bench/experiments/paired.py)
        }
    return out


# ------------------------------------------------------------------------------------------ training curves

_LOG_LINE = re.compile(r"^step (\d+)/\d+ \| loss (\S+) mse (\S+) vb (\S+) ")


def curves_from_mlflow(uri: str, run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``train/<name>`` histories, one point per step (a resumed run may have logged a step twice: the last wins)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for name in names:
        points: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, f"train/{name}"):
            if m.step not in points or m.timestamp >= points[m.step][0]:
                points[m.step] = (m.timestamp, m.value)
        out[name] = sorted((s, v) for s, (_, v) in points.items())
    return out


def curves_from_log(log: Path) -> dict[str, list[tuple[int, float]]]:
    """The same curves parsed from the trainer's console lines (when the MLflow store cannot be read)."""
    points: dict[int, tuple[float, float, float]] = {}
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line)
            if m:
                points[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    steps = sorted(points)
    return {name: [(s, points[s][i]) for s in steps] for i, name in enumerate(("loss", "mse", "vb"))}


def window_stats(curve: list[tuple[int, float]], frac: float = WINDOW) -> dict[str, float]:
    """Mean, standard deviation and detrended standard deviation (residuals of a straight-line fit) of the last
    ``frac`` of the points."""
    pts = [(s, v) for s, v in curve if math.isfinite(v)]
    k = max(3, int(round(len(pts) * frac)))
    if len(pts) < 3:
        return {}
    steps, vals = np.array([p[0] for p in pts[-k:]], float), np.array([p[1] for p in pts[-k:]], float)
    resid = vals - np.polyval(np.polyfit(steps, vals, 1), steps)
    return {
        "mean": float(vals.mean()),
        "std": float(vals.std(ddof=1)),
        "std_detrended": float(np.sqrt((resid**2).sum() / max(1, len(vals) - 2))),
        "points": len(vals),
        "from_step": int(steps[0]),
    }


def collect_run(runner: Any, arm: str, seed: int, names: list[str]) -> dict[str, Any]:
    """One run's figures: final bits/dim (exact bound on val), loss-curve statistics, where they came from."""
    run = runner.run_dir(arm, seed)
    rec: dict[str, Any] = {"seed": seed, "run_dir": str(run)}
    info_path = run / "run_info.json"
    run_id = json.loads(info_path.read_text()).get("mlflow_run_id") if info_path.is_file() else None
    rec["mlflow_run_id"] = run_id
    bpd_path = runner.bpd_json(arm, seed)
    if bpd_path.is_file():
        b = json.loads(bpd_path.read_text())
        rec.update(
            bpd=b["bits_per_dim"], bpd_stderr=b["bits_per_dim_stderr"], bpd_images=b["num_images"], step=b["step"]
        )
        rec["bpd_per_image"] = b.get("per_image_bpd")  # absent from reports made before it was stored
        vb = np.asarray(b["vb_per_t"])
        T = len(vb)
        rec["bpd_terms"] = {
            "prior": b["prior_bpd"],
            "L_0": float(vb[0]),
            **{f"L_t q{i + 1}": float(vb[max(1, i * T // 4) : (i + 1) * T // 4].sum()) for i in range(4)},
        }
    curves: dict[str, list[tuple[int, float]]] = {}
    source = "none"
    if run_id:
        try:
            curves = curves_from_mlflow(runner.uri, run_id, names)
            source = "mlflow"
        except Exception:  # noqa: BLE001 - fall back to the console log
            curves = {}
    if not curves or not any(curves.values()):
        curves = {k: v for k, v in curves_from_log(run / "train.log").items() if k in names}
        source = "train.log" if any(curves.values()) else "none"
    rec["curve_source"] = source
    rec["curves"] = {k: [[s, v] for s, v in c] for k, c in curves.items()}
    for name, c in curves.items():
        for key, value in window_stats(c).items():
            rec[f"{name}_{key}"] = value
    return rec


# ------------------------------------------------------------------------------------------ aggregation


def spread(values: list[float]) -> dict[str, Any]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"n": 0}
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
        "min": float(min(v)),
        "max": float(max(v)),
        "n": len(v),
        "values": v,
    }


SCALARS = ("bpd", "loss_std", "loss_std_detrended", "loss_mean", "vb_std", "vb_std_detrended", "vb_mean", "mse_mean")


def summarise_arm(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {k: spread([r.get(k) for r in seeds.values() if r.get(k) is not None]) for k in SCALARS}


def compare(better: dict[str, Any], worse: dict[str, Any]) -> tuple[bool | None, str]:
    """Is ``better``'s mean lower than ``worse``'s, and how firmly: (True/False/None when missing, words)."""
    if not better.get("n") or not worse.get("n"):
        return None, "not measured"
    if better["mean"] == worse["mean"]:
        return None, "equal means"
    lower = better["mean"] < worse["mean"]
    if better["n"] < 2 or worse["n"] < 2:
        return lower, "one seed: no spread to judge by"
    a, b = (better, worse) if lower else (worse, better)
    firm = a["max"] < b["min"]
    return lower, "seed ranges do not overlap" if firm else "seed ranges overlap: weak evidence"


def verdict_word(ok: bool | None) -> str:
    return {True: "agrees", False: "disagrees", None: "inconclusive"}[ok]


def _f(x: Any, nd: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pm(s: dict[str, Any], nd: int = 4) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}" if s["n"] > 1 else f"{s['mean']:.{nd}f}"


# ------------------------------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def plot_curves(path: Path, arms: dict[str, dict[str, Any]], names: list[str], title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        positive = True
        for i, (arm, data) in enumerate(arms.items()):
            for j, (_seed, rec) in enumerate(sorted(data["seeds"].items())):
                c = rec["curves"].get(name) or []
                if not c:
                    continue
                s, v = zip(*c, strict=True)
                positive &= min(v) > 0
                ax.plot(s, v, color=COLORS[i % len(COLORS)], alpha=0.8, lw=1, label=arm if j == 0 else None)
                start = rec.get(f"{name}_from_step")
                if start is not None and i == 0 and j == 0:
                    ax.axvspan(start, s[-1], color="0.9", zorder=0, label=f"noise window (last {WINDOW:.0%})")
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"train/{name}")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(path: Path, arms: dict[str, dict[str, Any]], metrics: list[tuple[str, str]], title: str) -> Path:
    """One panel per (metric key, label): bars = mean over seeds, error bars = std, dots = the seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.6 * len(arms) * len(metrics) + 2, 4), squeeze=False)
    names = list(arms)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for i, arm in enumerate(names):
            s = arms[arm]["summary"].get(key, {})
            if not s.get("n"):
                continue
            ax.bar(i, s["mean"], yerr=s["std"] if s["n"] > 1 else None, color=COLORS[i % len(COLORS)], alpha=0.6)
            ax.scatter([i] * len(s["values"]), s["values"], color="k", s=14, zorder=3)
            ax.annotate(f"{s['mean']:.3f}", (i, s["mean"]), ha="center", va="bottom", fontsize=8)
        vals = [v for arm in names for v in arms[arm]["summary"].get(key, {}).get("values", [])]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = (hi - lo) * 0.5 + 1e-3 * max(abs(hi), 1e-9)
            ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(textwrap.fill(title, 60), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(path: Path, table: list[dict[str, Any]], real: dict[str, Any] | None, T: int) -> Path:
    plt = _plt()
    panels = [("fid", "FID (classifier features)"), ("class_entropy", "class entropy / log 10"), ("bpd", "bits/dim")]
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 4.2), squeeze=False)
    groups = sorted({(r["arm"], r["method"]) for r in table})
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for arm, method in groups:
            rows = sorted((r for r in table if r["arm"] == arm and r["method"] == method), key=lambda r: r["steps"])
            rows = [r for r in rows if r.get(key, {}).get("n")]
            if not rows:
                continue
            x = [r["steps"] for r in rows]
            y = [r[key]["mean"] for r in rows]
            lo = [r[key]["mean"] - r[key]["min"] for r in rows]
            hi = [r[key]["max"] - r[key]["mean"] for r in rows]
            arm_i = sorted({g[0] for g in groups}).index(arm)
            ax.errorbar(
                x, y, yerr=[lo, hi], marker="o", capsize=3, color=COLORS[arm_i % len(COLORS)],
                ls="-" if method == "ddpm" else "--", label=f"{arm} {method}",
            )  # fmt: skip
        if real and key in real:
            ax.axhline(real[key], color="0.4", ls=":", label="held-out real images")
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in table})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(f"sampling steps (T = {T})")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Quality and likelihood against sampling steps (mean over seeds, bars: seed range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ reports


def _arm_table(arms: dict[str, dict[str, Any]], noise: bool) -> list[str]:
    head = "| arm | config | bits/dim (val, exact) | per seed |"
    sep = "|---|---|---:|---|"
    if noise:
        head += " std train/loss (last 25%) | detrended | std train/vb | mean train/loss |"
        sep += "---:|---:|---:|---:|"
    lines = [head, sep]
    for arm, data in arms.items():
        s = data["summary"]
        seeds = ", ".join(f"{k}: {_f(r.get('bpd'))}" for k, r in sorted(data["seeds"].items()))
        row = f"| {arm} ({data['description']}) | `{data['config']}` | {_pm(s['bpd'])} | {seeds} |"
        if noise:
            row += (
                f" {_pm(s['loss_std'], 5)} | {_pm(s['loss_std_detrended'], 5)} | {_pm(s['vb_std'], 5)} |"
                f" {_pm(s['loss_mean'])} |"
            )
        lines.append(row)
    return lines


def compare_bpd(arms: dict[str, dict[str, Any]], better: str, worse: str) -> tuple[bool | None, str]:
    """Is ``better``'s bits/dim lower than ``worse``'s: decided by the paired interval over images and seeds
    (True/False only where it excludes 0); runs without per-image values fall back to seed ranges, and say so."""
    import paired  # a sibling module, on sys.path like this one

    per = {a: {k: r.get("bpd_per_image") for k, r in arms[a]["seeds"].items()} for a in (better, worse)}
    iv = paired.paired_difference(per[better], per[worse])
    if iv is None:
        lower, how = compare(arms[better]["summary"]["bpd"], arms[worse]["summary"]["bpd"])
        return (lower if how == "seed ranges do not overlap" else None), how + " (no per-image values: no interval)"
    how = (
        f"paired difference {iv['mean']:+.4f} bits/dim, {iv['level']:.0%} interval [{iv['low']:+.4f}, "
        f"{iv['high']:+.4f}] over {iv['images']} images × {iv['seeds']} seeds"
    )
    lower = paired.decide(iv)
    return lower, how + ("" if lower is not None else ": the interval holds 0")


def compare_noise(arms: dict[str, dict[str, Any]], quieter: str, noisier: str) -> tuple[bool | None, str]:
    """Is ``quieter``'s train/loss noise lower: the per-seed ratio's t interval over seeds must exclude 1."""
    import paired

    iv = paired.seed_ratio(
        {k: r.get("loss_std") for k, r in arms[quieter]["seeds"].items()},
        {k: r.get("loss_std") for k, r in arms[noisier]["seeds"].items()},
    )
    if iv is None:
        return None, "fewer than 2 seeds: no interval"
    how = f"ratio ×{iv['ratio']:.3g}, {iv['level']:.0%} interval [×{iv['ratio_low']:.3g}, ×{iv['ratio_high']:.3g}] "
    how += f"({iv['method']})"
    lower = paired.decide(iv)
    return lower, how + ("" if lower is not None else ": the interval holds 1")


def verdicts(part: int, arms: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Sentences 'paper says X; here Y (agrees/disagrees/inconclusive)' and their machine-readable form. A
    verdict is given only where the interval of the difference excludes zero (bits/dim: paired over images and
    seeds; loss noise: the ratio over seeds); otherwise it is "inconclusive"."""
    S = {a: d["summary"] for a, d in arms.items()}
    out: list[str] = []
    facts: dict[str, Any] = {}

    def line(claim: str, here: str, ok: bool | None, how: str) -> None:
        out.append(f"Paper: {claim}. Here: {here} — **{verdict_word(ok)}** ({how}).")

    if part in (1, 2):
        good, bad = ("hybrid_cosine", "mse_fixed") if part == 1 else ("hybrid_cosine", "hybrid_linear")
        ok, how = compare_bpd(arms, good, bad)
        line(CLAIMS[part], f"{good} {_pm(S[good]['bpd'])} vs {bad} {_pm(S[bad]['bpd'])} bits/dim", ok, how)
        facts = {"agrees": ok, "strength": how}
    elif part == 3:
        ok1, how1 = compare_noise(arms, "kl_importance", "kl_uniform")
        ok2, how2 = compare_bpd(arms, "kl_importance", "kl_uniform")
        line(
            "importance sampling makes the L_vlb learning curve far less noisy (§3.3, Fig. 6)",
            f"std of train/loss over the last {WINDOW:.0%}: importance {_pm(S['kl_importance']['loss_std'], 5)} vs "
            f"uniform {_pm(S['kl_uniform']['loss_std'], 5)}",
            ok1,
            how1,
        )
        line(
            "and reaches a lower loss",
            f"bits/dim importance {_pm(S['kl_importance']['bpd'])} vs uniform {_pm(S['kl_uniform']['bpd'])}",
            ok2,
            how2,
        )
        facts = {"less_noisy": ok1, "less_noisy_strength": how1, "lower_bpd": ok2, "lower_bpd_strength": how2}
    elif part == 4:
        u = "hybrid_cosine"
        gains = {a: compare_bpd(arms, a, u) for a in ("hybrid_importance_vb", "hybrid_importance_loss")}
        firm_gain = [a for a, (lower, _) in gains.items() if lower is True]
        here = ", ".join(f"{a} {_pm(S[a]['bpd'])}" for a in (u, *gains)) + " bits/dim"
        how_gain = "; ".join(f"{a} − {u}: {how}" for a, (_, how) in gains.items())
        line(CLAIMS[4], here, not firm_gain if S[u]["bpd"].get("n") else None,
             f"agrees unless an importance arm's interval lies below uniform's: {how_gain}")  # fmt: skip
        vb_wins, how = compare_bpd(arms, "hybrid_importance_vb", "hybrid_importance_loss")
        winner = None if vb_wins is None else ("vb" if vb_wins else "loss")
        noise_vb, how_noise = compare_noise(arms, "hybrid_importance_vb", "hybrid_importance_loss")
        quieter = {True: "the history fed vb", False: "the history fed loss", None: "neither history"}[noise_vb]
        rec = (
            f"Recommended default: `diffusion.history_term: {winner}` (lower final bits/dim; vb − loss: {how})."
            if winner
            else f"No recommendation between the histories (vb − loss: {how}): keep the default "
            "`diffusion.history_term: loss`."
        )
        rec += f" Loss noise: {quieter} gives the less noisy train/loss (vb / loss: {how_noise})."
        if S[u]["bpd"].get("n") and not firm_gain:
            rec += (
                " Neither importance-sampling arm beats uniform sampling with an interval below zero, so "
                "`diffusion.timestep_sampler: uniform` stays the default for L_hybrid; history_term only matters "
                "when importance sampling is on."
            )
        out.append(rec)
        facts = {"firm_gain_over_uniform": firm_gain, "history_term_winner": winner, "strength": how}
    return out, facts


def paired_bpd(arms: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Every pair of arms: the paired bits/dim difference with its 95 % interval over images and seeds
    (bench/experiments/paired.py); a verdict only where the interval excludes zero."""
    import paired  # a sibling module, on sys.path like this one

    per = {a: {k: r.get("bpd_per_image") for k, r in d["seeds"].items()} for a, d in arms.items()}
    names = list(arms)
    facts: dict[str, Any] = {}
    text = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            iv = paired.paired_difference(per[a], per[b])
            facts[f"{a} - {b}"] = iv
            text.append("Paired: " + paired.describe(a, b, iv) + ".")
    return facts, text


def _experiment_arms(runner: Any, part: int, arm_names: list[str], descriptions: dict[str, str]) -> dict[str, Any]:
    names = CURVES.get(part, ["loss", "mse", "vb"])
    arms = {}
    for arm in arm_names:
        seeds = {k: collect_run(runner, arm, k, names) for k in runner.suite.seeds}
        arms[arm] = {
            "description": descriptions[arm],
            "config": f"configs/experiments/{arm}.yaml",
            "seeds": seeds,
            "summary": summarise_arm(seeds),
        }
    return arms


def write_experiment(part: int, runner: Any, arm_names: list[str], descriptions: dict[str, str]) -> list[Path]:
    """``expN.json``, ``expN_*.png`` and ``expN.md`` under the out dir; returns the files."""
    out, suite = runner.out, runner.suite
    if part == 5:
        return write_exp5(runner, arm_names, descriptions)
    arms = _experiment_arms(runner, part, arm_names, descriptions)
    lines, facts = verdicts(part, arms)
    facts["paired"], paired_text = paired_bpd(arms)
    lines += paired_text
    doc = {
        "experiment": part,
        "title": TITLES[part],
        "paper_claim": CLAIMS[part],
        "suite": _suite_dict(suite),
        "bpd_method": f"exact variational bound over all T = {suite.T} steps (trainer/evaluate.py bpd) of the first "
        f"{suite.bpd_images} val images, noise seed 0 (the same for every model)",
        "noise_window": f"last {WINDOW:.0%} of the logged points of train/<metric> (each a mean over train.log_every "
        "steps); std = sample std, std_detrended = std of the residuals of a straight-line fit",
        "arms": arms,
        "verdict": facts,
        "verdict_text": lines,
    }
    files = [out / f"exp{part}.json"]
    _write_json(files[0], doc)
    files.append(plot_curves(out / f"exp{part}_loss.png", arms, CURVES[part], f"Experiment {part}: {TITLES[part]}"))
    bars = [("bpd", "bits/dim (val, exact bound)")]
    if part in (3, 4):
        bars += [
            ("loss_std", f"std of train/loss, last {WINDOW:.0%}"),
            ("vb_std", f"std of train/vb, last {WINDOW:.0%}"),
        ]
    files.append(plot_bars(out / f"exp{part}_bpd.png", arms, bars, f"Experiment {part}: {TITLES[part]}"))
    md = [
        f"## Experiment {part}: {TITLES[part]}",
        "",
        _suite_line(suite),
        "",
        *_arm_table(arms, noise=part in (3, 4)),
        "",
        *[f"- {v}" for v in lines],
        "",
        f"Plots: `exp{part}_loss.png` (training curves, every seed), `exp{part}_bpd.png` (bars: mean over seeds, "
        "error bars: std, dots: seeds). Bits/dim: " + doc["bpd_method"] + ".",
    ]
    if part in (3, 4):
        md += ["", "Loss noise: " + doc["noise_window"] + "."]
    files.append(out / f"exp{part}.md")
    files[-1].write_text("\n".join(md) + "\n")
    return files


def write_exp5(runner: Any, arm_names: list[str], descriptions: dict[str, str]) -> list[Path]:
    out, suite = runner.out, runner.suite
    d = runner.exp5_dir()
    clf_info = json.loads((d / "classifier.json").read_text()) if (d / "classifier.json").is_file() else {}
    real_path = d / "real_val" / "quality.json"
    real = json.loads(real_path.read_text()) if real_path.is_file() else None
    rows: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    settings = runner.sample_settings()
    for arm in arm_names:
        for method, _, steps in settings:
            rec: dict[str, Any] = {"arm": arm, "method": method, "steps": steps}
            vals: dict[str, list[float]] = {}
            for seed in suite.seeds:
                q_path = runner.sample_dir(arm, seed, method, steps) / "quality.json"
                q = json.loads(q_path.read_text()) if q_path.is_file() else {}
                item = {"arm": arm, "seed": seed, "method": method, "steps": steps}
                for key in ("fid", "precision", "recall", "kid_mean", "coverage_5pct", "class_entropy", "confident"):
                    if key in q:
                        item[key] = q[key]
                if method == "ddpm":  # the bound belongs to the process, whatever samples it: listed with ddpm
                    item["bpd"] = _bpd_at(runner, arm, seed, steps)
                per_seed.append(item)
                for k, v in item.items():
                    if k not in ("arm", "seed", "method", "steps") and v is not None:
                        vals.setdefault(k, []).append(v)
            rec.update({k: spread(v) for k, v in vals.items()})
            rows.append(rec)
    paired_facts, paired_lines = exp5_paired(runner)
    lines, facts = _exp5_verdicts(rows, suite, paired_facts)
    lines += paired_lines
    facts["paired"] = paired_facts
    doc = {
        "experiment": 5,
        "title": TITLES[5],
        "paper_claim": CLAIMS[5],
        "suite": _suite_dict(suite),
        "feature_network": {**clf_info, "stand_in": STAND_IN},
        "samples_per_setting": suite.samples,
        "real_val_baseline": real,
        "bpd_method": f"bound of the respaced process (ddpm spacing) on the first {suite.bpd_images} val images; at "
        f"all T = {suite.T} steps the exact bound of trainer/evaluate.py bpd",
        "table": rows,
        "per_seed": per_seed,
        "verdict": facts,
        "verdict_text": lines,
    }
    files = [out / "exp5.json"]
    _write_json(files[0], doc)
    files.append(plot_steps(out / "exp5_steps.png", rows, real, suite.T))
    acc = clf_info.get("val_accuracy")
    md = [
        f"## Experiment 5: {TITLES[5]}",
        "",
        _suite_line(suite) + f" Models: those of experiment 1 ({', '.join(arm_names)}), EMA weights. "
        f"{suite.samples} samples per setting, sampler seed 0 (the same noise for every model).",
        "",
        f"Feature network: classifier `{clf_info.get('name', '?')}`, held-out (val) accuracy "
        f"{_f(acc, 3) if acc is not None else '?'}"
        + (" (**low: its features and predictions are unreliable**)" if acc is not None and acc < 0.95 else "")
        + f". {STAND_IN}",
        "",
        "| arm | method | steps | FID | precision | recall | coverage (>=5%) | class entropy | confident | bits/dim |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['arm']} | {r['method']} | {r['steps']} | {_pm(r.get('fid', {}), 2)} | "
            f"{_pm(r.get('precision', {}), 3)} | {_pm(r.get('recall', {}), 3)} | "
            f"{_pm(r.get('coverage_5pct', {}), 2)} | "
            f"{_pm(r.get('class_entropy', {}), 3)} | {_pm(r.get('confident', {}), 3)} | {_pm(r.get('bpd', {}), 3)} |"
        )
    if real:
        md.append(
            f"| held-out real images ({real.get('num_samples')}) | | | {_f(real.get('fid'), 2)} | "
            f"{_f(real.get('precision'), 3)} | {_f(real.get('recall'), 3)} | {_f(real.get('coverage_5pct'), 2)} | "
            f"{_f(real.get('class_entropy'), 3)} | {_f(real.get('confident'), 3)} | |"
        )
    md += ["", *[f"- {v}" for v in lines], "", "Plot: `exp5_steps.png`. Bits/dim: " + doc["bpd_method"] + "."]
    if not suite.ddim_full:
        md += ["", f"DDIM at all T = {suite.T} steps is not sampled (budget; `--ddim-full` adds it)."]
    files.append(out / "exp5.md")
    files[-1].write_text("\n".join(md) + "\n")
    return files


def _bound(runner: Any, arm: str, seed: int, steps: int) -> dict[str, Any]:
    """One model's bound of the process with ``steps`` steps (all T: evaluate.py bpd's report; fewer: the
    respaced one's entry); empty when not measured."""
    if steps == runner.suite.T:
        p = runner.bpd_json(arm, seed)
        return json.loads(p.read_text()) if p.is_file() else {}
    p = runner.exp5_dir() / "bpd_respaced" / f"{arm}-seed{seed}.json"
    return json.loads(p.read_text())["by_steps"].get(str(steps), {}) if p.is_file() else {}


def _bpd_at(runner: Any, arm: str, seed: int, steps: int) -> float | None:
    return _bound(runner, arm, seed, steps).get("bits_per_dim")


def _bpd_per_image(runner: Any, arm: str, seed: int, steps: int) -> list[float] | None:
    return _bound(runner, arm, seed, steps).get("per_image_bpd")


H, M = "hybrid_cosine", "mse_fixed"


def exp5_paired(runner: Any, resamples: int = 1000) -> tuple[dict[str, Any], list[str]]:
    """Experiment 5's comparisons with 95 % intervals over seeds and paired items: the respaced bounds of the two
    models per step count (paired over val images), and FID statistics (paired over samples: sample i of every
    set starts from the same noise; bench/experiments/paired.py's FID bootstrap, features recomputed from the
    stored samples with the suite's classifier)."""
    import paired

    from trainer.evaluation.features import load_feature_net
    from trainer.evaluation.quality import load_reference

    suite, T = runner.suite, runner.suite.T
    facts, lines = exp5_bound_intervals(runner)
    d = runner.exp5_dir()
    clf, ref = d / "classifier.pt", d / "ref_train.npz"
    settings = runner.sample_settings()
    keys = [(s, a, m, k) for s in suite.seeds for a in (H, M) for m, _, k in settings]
    paths = {(s, a, m, k): runner.sample_dir(a, s, m, k) / "samples.npz" for s, a, m, k in keys}
    if not (clf.is_file() and ref.is_file() and all(p.is_file() for p in paths.values())):
        lines.append("FID intervals: not computed (sample sets or the classifier missing).")
        return facts, lines
    net = load_feature_net(str(clf), "cpu")
    reference, _ = load_reference(ref)
    fid = paired.FastFID(reference.pool.mean, reference.pool.cov)
    feats: dict[int, dict[str, np.ndarray]] = {s: {} for s in suite.seeds}
    for (s, a, m, k), path in paths.items():
        with np.load(path, allow_pickle=False) as z:
            feats[s][f"{a} {m} {k}"] = net.extract(z["arr_0"], batch_size=256).pool

    def pick(*names: str) -> dict[int, dict[str, np.ndarray]]:
        return {s: {n: feats[s][n] for n in names} for s in suite.seeds}

    mid = [k for k in suite.sample_steps if 50 <= k <= 100] or list(suite.sample_steps)
    few = min(suite.sample_steps)

    def ratio_gap(f: dict[str, float]) -> float:
        r = {a: np.mean([f[f"{a} ddpm {k}"] / f[f"{a} ddpm {T}"] for k in mid]) for a in (H, M)}
        return float(r[H] - r[M])

    stats = {
        "fid_ratio_gap": (
            pick(*[f"{a} ddpm {k}" for a in (H, M) for k in (*mid, T)]),
            ratio_gap,
            f"FID({'/'.join(map(str, mid))} steps) / FID(all T), mean over step counts, {H} − {M}",
        ),
        f"fid_{few}": (
            pick(f"{H} ddpm {few}", f"{M} ddpm {few}"),
            lambda f: f[f"{H} ddpm {few}"] - f[f"{M} ddpm {few}"],
            f"FID at {few} steps (ancestral), {H} − {M}",
        ),
        f"fid_ddim_vs_ddpm_{few}": (
            pick(f"{H} ddim {few}", f"{H} ddpm {few}"),
            lambda f: f[f"{H} ddim {few}"] - f[f"{H} ddpm {few}"],
            f"FID at {few} steps, {H}: DDIM − ancestral",
        ),
    }
    for key, (sets, stat, what) in stats.items():
        iv = paired.paired_statistic(sets, stat, fid, resamples=resamples)
        iv["what"] = what
        facts[key] = iv
        word = {True: "below 0", False: "above 0", None: "undecided (the interval holds 0)"}[paired.decide(iv)]
        lines.append(
            f"Paired, {what}: {iv['mean']:+.3f}, {iv['level']:.0%} interval [{iv['low']:+.3f}, {iv['high']:+.3f}] "
            f"over {iv['images']} paired samples × {iv['seeds']} seeds: {word}."
        )
    return facts, lines


def exp5_bound_intervals(runner: Any) -> tuple[dict[str, Any], list[str]]:
    """The variational bound of the two models' respaced processes at every step count (and at all T), paired
    over val images and seeds: learned − fixed variances."""
    import paired

    suite = runner.suite
    facts: dict[str, Any] = {}
    lines: list[str] = []
    for k in [*suite.sample_steps, suite.T]:
        per = {a: {s: _bpd_per_image(runner, a, s, k) for s in suite.seeds} for a in (H, M)}
        per = {a: {s: v for s, v in d.items() if v is not None} for a, d in per.items()}
        iv = paired.paired_difference(per[H], per[M])
        facts[f"bpd_{k}"] = iv
        lines.append(f"Paired, bound of the {k}-step process: " + paired.describe(H, M, iv) + ".")
    return facts, lines


def write_exp5_bounds(runner: Any) -> list[Path]:
    """``exp5_bounds.{json,md}``: only the likelihood half of experiment 5 (``run.py --part 5 --bounds-only``),
    which needs no sampling: the bound of each respaced process, per arm and seed, with the paired intervals."""
    suite, out = runner.suite, runner.out
    facts, lines = exp5_bound_intervals(runner)
    table = {
        a: {
            str(k): spread([v for s in suite.seeds if (v := _bpd_at(runner, a, s, k)) is not None])
            for k in [*suite.sample_steps, suite.T]
        }
        for a in (H, M)
    }
    doc = {"experiment": 5, "part": "bounds only", "suite": _suite_dict(suite), "bpd": table, "paired": facts}
    _write_json(out / "exp5_bounds.json", doc)
    steps = [*suite.sample_steps, suite.T]
    md = [
        "## Experiment 5, likelihood half: the bound of the respaced processes (no sampling)",
        "",
        _suite_line(suite) + f" Bits/dim on the first {suite.bpd_images} val images, the same noise for every model.",
        "",
        "| arm | " + " | ".join(f"{k} steps" for k in steps) + " |",
        "|---|" + "---:|" * len(steps),
        *[f"| {a} | " + " | ".join(_pm(table[a][str(k)], 3) for k in steps) + " |" for a in (H, M)],
        "",
        *[f"- {v}" for v in lines],
    ]
    (out / "exp5_bounds.md").write_text("\n".join(md) + "\n")
    return [out / "exp5_bounds.json", out / "exp5_bounds.md"]


def _exp5_verdicts(
    rows: list[dict[str, Any]], suite: Any, pf: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """The claims' sentences; the verdict words follow the paired intervals of :func:`exp5_paired` (``pf``):
    "agrees"/"disagrees" only where the interval excludes 0, "inconclusive" otherwise."""
    import paired

    pf = pf or {}

    def get(arm: str, method: str, steps: int, key: str) -> float | None:
        for r in rows:
            if (r["arm"], r["method"], r["steps"]) == (arm, method, steps) and r.get(key, {}).get("n"):
                return r[key]["mean"]
        return None

    def word(key: str) -> bool | None:  # the interval lies below 0: the claim holds
        return paired.decide(pf.get(key))

    T = suite.T
    mid = [k for k in suite.sample_steps if 50 <= k <= 100] or list(suite.sample_steps)
    ratios: dict[str, dict[int, float]] = {}
    for arm in (H, M):
        full = get(arm, "ddpm", T, "fid")
        ratios[arm] = {
            k: get(arm, "ddpm", k, "fid") / full for k in mid if full and get(arm, "ddpm", k, "fid") is not None
        }
    lines = []
    ok = word("fid_ratio_gap")
    if ratios[H] and ratios[M]:
        shown = "; ".join(
            f"{arm}: " + ", ".join(f"{k} steps x{r:.2f}" for k, r in ratios[arm].items()) for arm in ratios
        )
        lines.append(
            f"Paper: {CLAIMS[5]}. Here (ddpm, FID at {'/'.join(map(str, mid))} steps over FID at all T = {T}): "
            f"{shown} — **{verdict_word(ok)}** (the paired interval of the difference of the ratios, below)."
        )
    else:
        lines.append(f"Paper: {CLAIMS[5]}. Here: not measured (missing sample sets).")
    bpd_h = {k: get(H, "ddpm", k, "bpd") for k in suite.sample_steps}
    bpd_m = {k: get(M, "ddpm", k, "bpd") for k in suite.sample_steps}
    if all(v is not None for v in (*bpd_h.values(), *bpd_m.values())):
        decided = [word(f"bpd_{k}") for k in suite.sample_steps]
        verdict = (
            "keep a better bound at every step count (every paired interval below 0)."
            if all(v is True for v in decided)
            else "do not win at every step count with an interval below 0."
        )
        lines.append(
            "Likelihood of the respaced processes: bits/dim "
            + ", ".join(f"{k} steps {bpd_h[k]:.3f} (learned) vs {bpd_m[k]:.3f} (fixed)" for k in suite.sample_steps)
            + " — learned variances "
            + verdict
        )
    few = min(suite.sample_steps)
    d_h, a_h = get(H, "ddim", few, "fid"), get(H, "ddpm", few, "fid")
    if d_h is not None and a_h is not None:
        lines.append(
            f"Paper: DDIM gives better samples than respaced ancestral sampling below ~50 steps. Here, at {few} "
            f"steps ({H}): DDIM FID {d_h:.2f} vs ddpm {a_h:.2f} — **{verdict_word(word(f'fid_ddim_vs_ddpm_{few}'))}** "
            "(paired interval below)."
        )
    return lines, {"agrees": ok, "fid_ratio_to_full": ratios}


def _suite_dict(suite: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(suite)


def _suite_line(suite: Any) -> str:
    s = (
        f"Digits 16x16 (val split held out), quickstart UNet, T = {suite.T}, {suite.train_steps} steps of 32 images "
        f"per run, seeds {suite.seeds}; bits/dim on {suite.bpd_images} val images."
    )
    return ("**SMOKE TEST (everything shrunk): these numbers mean nothing.** " + s) if suite.smoke else s


def write_index(out: Path) -> Path:
    parts = [out / f"exp{i}.md" for i in range(1, 6) if (out / f"exp{i}.md").is_file()]
    text = "# Improved-DDPM claims at small scale (bench/experiments/run.py)\n\n" + "\n".join(
        p.read_text() for p in parts
    )
    (out / "summary.md").write_text(text)
    return out / "summary.md"


def log_summary(uri: str, experiment: str, part: int, files: list[Path], params: dict[str, Any]) -> str | None:
    """The part's JSON, markdown and plots (and its headline numbers) in one run of ``experiment``, reused on rerun."""
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.part = '{part}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(exp.experiment_id, run_name=f"exp{part}", tags={"part": str(part)}).info.run_id
            for k, v in params.items():
                client.log_param(run_id, k, json.dumps(v) if isinstance(v, list) else v)
        for f in files:
            client.log_artifact(run_id, str(f))
        doc = json.loads(next(f for f in files if f.suffix == ".json").read_text())
        metrics = {}
        for arm, data in doc.get("arms", {}).items():
            for key in ("bpd", "loss_std", "vb_std"):
                s = data["summary"].get(key, {})
                if s.get("n"):
                    metrics[f"{arm}/{key}_mean"] = s["mean"]
        for r in doc.get("table", []):
            for key in ("fid", "bpd", "class_entropy"):
                if r.get(key, {}).get("n"):
                    metrics[f"{r['arm']}/{r['method']}_{r['steps']}/{key}"] = r[key]["mean"]
        import time

        ts = int(time.time() * 1000)
        if metrics:
            client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
        client.set_terminated(run_id)
        return run_id
    except Exception as err:  # noqa: BLE001 - the files are on disk already
        print(f"warning: could not log experiment {part} to MLflow: {type(err).__name__}: {err}")
        return None
