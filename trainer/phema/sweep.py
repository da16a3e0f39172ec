"""The sweep: evaluate every reconstructed EMA (and the run's fixed-rate EMAs at the same step), log a table
and a plot (σ_rel against the metric, the tracked profiles marked) to the training run in MLflow, and name
the best.

The evaluations are the run's periodic evaluation (:class:`trainer.evaluation.periodic.PeriodicEval`): the
bits/dim estimate on the first ``--eval-images`` validation images with the same timesteps and noise for
every model (so the rows differ only by their weights), and FID/precision/recall/KID of samples drawn with
the same noise for every model, against a reference made with the chosen feature network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, ConfigError, config_from_dict
from trainer.distributed import DistEnv, broadcast_object
from trainer.export import EXPORT_NAME
from trainer.phema.reconstruct import Plan, load_state
from trainer.tracking import log_to_run

METRICS = {"bpd": "eval/val_bpd_est", "fid": "eval/fid"}


class _Weights:
    """What PeriodicEval reads weights from (an EMA's ``full_state_dict``), holding one set."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def full_state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        return self.weights


class _Collect:
    """A tracker that keeps the metrics of one evaluation instead of logging them against the training step."""

    metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics = dict(metrics)


def sweep_config(
    config: dict[str, Any],
    evals: list[str],
    data_root: str | None,
    images: int,
    timesteps: int,
    features: str | None,
    reference: str | None,
    fid_samples: int,
    fid_steps: str | None = None,
) -> Config:
    """The run's config with its periodic evaluation set to what the sweep measures."""
    data = json.loads(json.dumps(config))
    train = data["train"]
    train.update(eval_every=1, eval_images=images, eval_timesteps=timesteps, eval_fid_samples=fid_samples)
    train.update(eval_features=None, eval_reference=None)
    if "fid" in evals:
        if not (features and reference):
            raise ConfigError("--eval fid needs --features and --reference (trainer/evaluate.py stats makes one)")
        train.update(eval_features=features, eval_reference=reference)
        if fid_steps is not None:
            train["eval_sample_steps"] = fid_steps
    if data_root is not None:
        data["data"]["root"] = data_root
    return config_from_dict(data, source="the run's config (sweep)")


def run_sweep(
    env: DistEnv, run_dir: Path, plan: Plan, exports: list[Path], cfg: Config, evals: list[str]
) -> list[dict]:
    """Collective. Returns the table's rows (on rank 0; empty elsewhere)."""
    from trainer.data import load_manifest
    from trainer.evaluation.periodic import PeriodicEval

    purpose = f"post-hoc EMA sweep at step {plan.step}: every model evaluated the same way"
    evaluator = PeriodicEval.create(cfg, env, load_manifest(cfg.data.root), purpose=purpose)
    assert evaluator is not None  # eval_every is set
    models: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
    for tg, path in zip(plan.targets, exports, strict=True):
        state = load_state(path)
        models.append(
            ({"model": f"sigma_rel {tg.sigma_rel:.4f}", "sigma_rel": tg.sigma_rel, "asked": tg.label}, state["model"])
        )
    fixed = run_dir / "checkpoints" / f"step_{plan.step:08d}" / EXPORT_NAME
    # The configured fixed-rate EMAs at the same step, for comparison. Rank 0 decides whether they are there:
    # every rank must run the same number of (collective) evaluations, whatever its view of the directory.
    if broadcast_object(fixed.is_file() if env.is_main else None, env.device):
        state = load_state(fixed)
        for rate, weights in state["ema"].items():
            models.append(({"model": f"ema {rate}", "sigma_rel": None, "asked": f"train.ema_rates {rate}"}, weights))
    rows = []
    for row, weights in models:
        collect = _Collect()
        evaluator.run(plan.step, _Weights(weights), collect)
        for name in evals:
            row[name] = collect.metrics.get(METRICS[name])
        rows.append(row)
    return rows if env.is_main else []


def best_of(rows: list[dict], metric: str) -> dict | None:
    """The reconstructed row with the lowest value of ``metric`` (lower is better for bits/dim and FID)."""
    done = [r for r in rows if r["sigma_rel"] is not None and r.get(metric) is not None]
    return min(done, key=lambda r: r[metric]) if done else None


def write_report(
    out: Path, rows: list[dict], evals: list[str], tracked: list[float], step: int, meta: dict[str, Any]
) -> list[Path]:
    """Table (JSON + Markdown) and one plot per metric; logged to the run in MLflow. Rank 0 only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best = {m: best_of(rows, m) for m in evals}
    (out / "sweep.json").write_text(
        json.dumps({"step": step, "tracked": tracked, "rows": rows, "best": best}, indent=1)
    )
    lines = [
        "| model | asked | " + " | ".join(evals) + " |",
        "| --- | --- | " + " | ".join("---" for _ in evals) + " |",
    ]
    for r in rows:
        vals = " | ".join("" if r.get(m) is None else f"{r[m]:.4f}" for m in evals)
        lines.append(f"| {r['model']} | {r['asked']} | {vals} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    files = [out / "sweep.json", out / "sweep.md"]
    for m in evals:
        recon = sorted((r["sigma_rel"], r[m]) for r in rows if r["sigma_rel"] is not None and r.get(m) is not None)
        if not recon:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s for s, _ in recon], [v for _, v in recon], "o-", label="reconstructed")
        for i, s in enumerate(tracked):
            ax.axvline(s, color="gray", ls="--", lw=1, label="tracked profiles" if i == 0 else None)
        for r in rows:
            if r["sigma_rel"] is None and r.get(m) is not None:
                ax.axhline(r[m], color="tab:red", ls=":", lw=1, label=r["model"])
        if best[m] is not None:
            ax.plot(
                [best[m]["sigma_rel"]], [best[m][m]], "r*", ms=12, label=f"best sigma_rel {best[m]['sigma_rel']:.3f}"
            )
        ax.set_xlabel("sigma_rel")
        ax.set_ylabel(m)
        ax.set_title(f"post-hoc EMA sweep at step {step}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"sweep_{m}.png", dpi=100)
        plt.close(fig)
        files.append(out / f"sweep_{m}.png")
    metrics = {}
    for m, b in best.items():
        if b is not None:
            metrics[f"phema/best_sigma_rel_{m}"] = b["sigma_rel"]
            metrics[f"phema/best_{m}"] = b[m]
    log_to_run(meta.get("tracking_uri"), meta.get("mlflow_run_id"), files, metrics, f"phema/sweep_step{step}", step)
    print("\n".join(lines), flush=True)
    for m, b in best.items():
        if b is not None:
            print(f"best by {m}: sigma_rel {b['sigma_rel']:.4f} ({b['asked']}): {b[m]:.4f}", flush=True)
    return files
