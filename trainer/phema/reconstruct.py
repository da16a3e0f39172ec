"""Reconstruct the EMA of any σ_rel at a snapshot step from a run's post-hoc EMA snapshots, on any number
of ranks, and write each as a normal export (``trainer/export.py``) that ``trainer/sample.py`` and
``trainer/evaluate.py`` read unchanged.

    python -m trainer.phema reconstruct runs/x --sigma-rel 0.03 0.07 [--step S]
    torchrun --nproc_per_node 4 -m trainer.phema reconstruct runs/x --decay 0.9999 --half-life-images 5e6

The coefficients come from :func:`trainer.phema.profiles.solve_coefficients` over the snapshots at or
before step S (the profile clock t of each is its count of kept steps). The parameters are split across
the ranks by name (balanced by size): a rank reads only its parameters from each snapshot (memory-mapped,
so a ZeRO-3 snapshot's other slices are never loaded), accumulates Σ x_i·θ_i in float64 in snapshot order
and casts to float32. Each parameter is computed by exactly one rank with the same operations in the same
order whatever the number of ranks, so the result is the same bit for bit on 1 or N ranks. Rank 0 then
merges the ranks' parts into the exports.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import CheckpointError, atomic_torch_save
from trainer.config import ConfigError, config_from_dict
from trainer.distributed import DistEnv, barrier, broadcast_object
from trainer.export import EXPORT_NAME, export_weights
from trainer.phema.profiles import (
    SIGMA_REL_MAX,
    sigma_rel_of_decay,
    sigma_rel_of_half_life,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from trainer.phema.snapshots import SNAPSHOT_DIR, SnapshotError, check_index, read_index

DEFAULT_MAX_ERROR = 0.05
"""Largest relative L2 error ||p_r - Σ x_i p_i|| / ||p_r|| of a reconstructed profile accepted by default."""


@dataclass(frozen=True)
class Target:
    sigma_rel: float
    label: str
    """How the user asked for it ("sigma_rel 0.03", "decay 0.9999", "half-life 5e+06 images")."""


@dataclass(frozen=True)
class Plan:
    """What to combine: the snapshots used (index entries), the (entry, σ_rel) of each coefficient row, and
    one column of coefficients per target, with the fit's relative error."""

    step: int
    images: int
    entries: list[dict[str, Any]]
    rows: list[tuple[int, float]]
    targets: list[Target]
    coefficients: np.ndarray
    errors: np.ndarray


def make_plan(
    root: Path,
    step: int | None,
    sigma_rels: list[float],
    decays: list[float],
    half_lives: list[float],
    max_error: float = DEFAULT_MAX_ERROR,
) -> Plan:
    """Read and check the index of ``root`` (a run's ``phema`` directory) and solve for the coefficients.
    Raises SnapshotError (one line) for missing snapshots, a stale index or a σ_rel out of range."""
    entries = read_index(root)
    check_index(root, entries)
    if not entries:
        raise SnapshotError(f"{root / 'index.json'}: lists no snapshots")
    at = entries[-1] if step is None else next((e for e in entries if e["step"] == step), None)
    if at is None:
        steps = [e["step"] for e in entries]
        raise SnapshotError(f"--step {step}: no snapshot at that step in {root} (snapshot steps: {steps})")
    used = [e for e in entries if e["step"] <= at["step"]]
    t_end, images = float(at["t"]), int(at["images"])
    targets = [Target(s, f"sigma_rel {s:g}") for s in sigma_rels]
    targets += [Target(sigma_rel_of_decay(d, t_end), f"decay {d:g}") for d in decays]
    targets += [Target(sigma_rel_of_half_life(h, images), f"half-life {h:g} images") for h in half_lives]
    if not targets:
        raise SnapshotError("nothing to reconstruct: give --sigma-rel, --decay or --half-life-images")
    for tg in targets:
        if not 0.0 < tg.sigma_rel <= SIGMA_REL_MAX:
            raise SnapshotError(
                f"{tg.label}: sigma_rel {tg.sigma_rel:.4g} at step {at['step']} is out of range "
                f"(0, {SIGMA_REL_MAX:.4f}]"
            )
    rows = [(i, float(s)) for i, e in enumerate(used) for s in e["sigma_rels"]]
    snap_t = np.array([float(used[i]["t"]) for i, _ in rows])
    if (snap_t <= 0).any():
        raise SnapshotError(f"{root}: a snapshot before the first kept step cannot be combined")
    snap_g = np.array([sigma_rel_to_gamma(s) for _, s in rows])
    out_g = np.array([sigma_rel_to_gamma(tg.sigma_rel) for tg in targets])
    x, err = solve_coefficients(snap_t, snap_g, np.full(len(targets), t_end), out_g)
    for tg, e in zip(targets, err, strict=True):
        if not np.isfinite(e) or e > max_error:
            raise SnapshotError(
                f"{tg.label}: sigma_rel {tg.sigma_rel:.4g} is out of range of the {len(used)} snapshots up to step "
                f"{at['step']} (relative profile error {e:.3g} > --max-error {max_error:g}); snapshot more often or "
                "choose a sigma_rel closer to the tracked ones"
            )
    return Plan(int(at["step"]), images, used, rows, targets, x, err)


def split_names(shapes: dict[str, list[int]], world: int) -> list[list[str]]:
    """Parameters per rank, balanced by size (largest first onto the least-loaded rank; ties to the lower
    rank): deterministic, and every name on exactly one rank."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(shapes, key=lambda n: (-int(np.prod(shapes[n])), n)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(name)
        load[r] += int(np.prod(shapes[name]))
    return out


def load_state(path: Path) -> dict[str, Any]:
    """A snapshot or export file (tensors only); an unreadable one is a one-line SnapshotError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise SnapshotError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def _full(states: list[dict[str, Any]], key: str, name: str, shape: list[int], zero3: bool) -> torch.Tensor:
    """One parameter's full tensor of profile ``key`` from a snapshot's rank files, in the EMA's layouts
    (:mod:`trainer.ema`): ZeRO-3 shards concatenated in rank order and cut to size, or the pieces of the
    rank slices of the flattened parameters that cover it."""
    numel = int(np.prod(shape))
    if zero3:
        flat = torch.cat([s["shadows"][key][name].reshape(-1) for s in states])
    else:
        flat = _from_slices(states, key, name, numel)
    if flat.numel() < numel:
        raise SnapshotError(f"snapshot parameter {name!r}: {flat.numel()} values saved, its shape needs {numel}")
    return flat[:numel].view(shape)


def _from_slices(states: list[dict[str, Any]], key: str, name: str, numel: int) -> torch.Tensor:
    """Parameter ``name`` out of the ``sliced`` layout: each rank saved ``[start, end)`` of one flat vector of
    every parameter in order (``names``, ``shapes``)."""
    names, shapes = states[0]["names"], states[0]["shapes"]
    if isinstance(shapes, dict):  # a snapshot file keeps the shapes by name (PowerEMA.full_shapes)
        shapes = [shapes[n] for n in names]
    if name not in names:
        raise SnapshotError(f"snapshot has no parameter {name!r}")
    i = names.index(name)
    lo = sum(int(np.prod(sh)) for sh in shapes[:i])
    out = torch.empty(numel, dtype=torch.float32)
    filled = 0
    for s in states:
        start, end = int(s["start"]), int(s["end"])
        a, b = max(lo, start), min(lo + numel, end)
        if a < b:
            out[a - lo : b - lo] = s["shadows"][key].reshape(-1)[a - start : b - start]
            filled += b - a
    if filled != numel:
        raise SnapshotError(f"snapshot parameter {name!r}: the rank files hold {filled} of its {numel} values")
    return out


def reconstruct_part(
    root: Path, plan: Plan, names: list[str], shapes: dict[str, list[int]]
) -> list[dict[str, torch.Tensor]]:
    """This rank's parameters of every target: Σ_rows x[row, k]·θ_row, accumulated in float64 in row order."""
    acc = [{n: torch.zeros(shapes[n], dtype=torch.float64) for n in names} for _ in plan.targets]
    row = 0
    for e in plan.entries:
        states = [load_state(root / e["dir"] / f) for f in e["files"]]
        if any(int(s.get("step", -1)) != e["step"] for s in states):
            raise SnapshotError(f"{root / e['dir']}: its files are not of step {e['step']} (stale index)")
        for s in e["sigma_rels"]:
            key = next((k for k in states[0]["shadows"] if float(k) == float(s)), None)
            if key is None:
                raise SnapshotError(f"{root / e['dir']}: has no profile sigma_rel {s} (stale index)")
            for n in names:
                theta = _full(states, key, n, shapes[n], bool(e["zero3"])).double()
                for k in range(len(plan.targets)):
                    acc[k][n].add_(theta, alpha=float(plan.coefficients[row, k]))
            row += 1
    return [{n: v.float() for n, v in a.items()} for a in acc]


def out_dir_for(base: Path, target: Target, step: int) -> Path:
    return base / f"sigma{target.sigma_rel:.4f}_step{step:08d}"


def newest_export(run_dir: Path) -> dict[str, Any]:
    found = sorted((run_dir / "checkpoints").glob(f"step_*/{EXPORT_NAME}"))
    if not found:
        raise SnapshotError(f"{run_dir / 'checkpoints'}: no {EXPORT_NAME} to take the run's config from")
    state = load_state(found[-1])
    return {"config": state["config"], "meta": dict(state["meta"])}


ERRORS = (SnapshotError, CheckpointError, ConfigError)
"""What the command reports as one line (exit 2)."""


def reconstruct(
    env: DistEnv,
    run_dir: Path,
    sigma_rels: list[float],
    decays: list[float],
    half_lives: list[float],
    step: int | None = None,
    out: Path | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
) -> tuple[Plan, list[Path]]:
    """Collective: write one export per target; returns the plan and the exports' paths (on every rank)."""
    root = run_dir / SNAPSHOT_DIR
    plan = make_plan(root, step, sigma_rels, decays, half_lives, max_error)
    # Read on every rank before any work: a run without an export fails at once, on every rank alike.
    run = newest_export(run_dir)
    try:
        rate = str(config_from_dict(run["config"]).sample_ema_rate)
    except ConfigError as err:
        raise SnapshotError(f"{run_dir}: its export's config does not load ({err})") from None
    base = out or root / "reconstructed"
    first_path = root / plan.entries[-1]["dir"] / plan.entries[-1]["files"][0]
    first = load_state(first_path)
    if "shapes" not in first or "shadows" not in first:
        raise SnapshotError(f"{first_path}: not a post-hoc EMA snapshot of this trainer (no shapes/shadows)")
    shapes = {n: list(s) for n, s in first["shapes"].items()}
    order = list(shapes)
    mine = split_names(shapes, env.world_size)[env.rank]
    parts = reconstruct_part(root, plan, mine, shapes)
    scratch = base / f".parts_step{plan.step:08d}"
    if env.is_main:
        scratch.mkdir(parents=True, exist_ok=True)
    barrier()
    atomic_torch_save(parts, scratch / f"rank_{env.rank}.pt")
    barrier()
    paths = [out_dir_for(base, tg, plan.step) / EXPORT_NAME for tg in plan.targets]
    error = None
    if env.is_main:
        try:
            _merge_and_export(run, rate, plan, scratch, paths, order, env.world_size)
        except (*ERRORS, OSError) as err:  # told to every rank below: none waits for rank 0 in vain
            error = str(err) if isinstance(err, ERRORS) else f"writing the exports: {type(err).__name__}: {err}"
        shutil.rmtree(scratch, ignore_errors=True)
    error = broadcast_object(error, env.device)
    if error is not None:
        raise SnapshotError(error)
    return plan, paths


def _merge_and_export(
    run: dict[str, Any],
    rate: str,
    plan: Plan,
    scratch: Path,
    paths: list[Path],
    order: list[str],
    world_size: int,
) -> None:
    """Rank 0: join every rank's parameters of each target and write the targets' exports."""
    merged: list[dict[str, torch.Tensor]] = [{} for _ in plan.targets]
    for r in range(world_size):
        for k, part in enumerate(load_state(scratch / f"rank_{r}.pt")):
            merged[k].update(part)
    for k, (tg, path) in enumerate(zip(plan.targets, paths, strict=True)):
        weights = {n: merged[k][n].clone() for n in order}
        coeffs = {
            f"{plan.entries[i]['step']}:{s:g}": float(plan.coefficients[j, k]) for j, (i, s) in enumerate(plan.rows)
        }
        meta = {
            **run["meta"],
            "phema": {
                "sigma_rel": tg.sigma_rel,
                "asked": tg.label,
                "step": plan.step,
                "images": plan.images,
                "profile_error": float(plan.errors[k]),
                "coefficients": json.dumps(coeffs),
            },
        }
        # The reconstruction is both the "model" and the EMA the run's config samples from by default.
        export_weights(path, run["config"], plan.step, weights, {rate: weights}, meta)
        print(
            f"reconstructed {tg.label} (sigma_rel {tg.sigma_rel:.4f}) at step {plan.step} from "
            f"{len(plan.entries)} snapshots, profile error {plan.errors[k]:.2e}: {path}",
            flush=True,
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run's train.output_dir (holds phema/ and checkpoints/)")
    p.add_argument("--sigma-rel", type=float, nargs="*", default=[], help="profile widths σ_rel to reconstruct")
    p.add_argument("--decay", type=float, nargs="*", default=[], help="classical EMA decays per step (matched std)")
    p.add_argument("--half-life-images", type=float, nargs="*", default=[], help="EMA half-lives in training images")
    p.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at (default: the newest)")
    p.add_argument("--out", type=Path, default=None, help="where the exports go (default RUN_DIR/phema/reconstructed)")
    p.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR, help="largest relative profile error")
    p.add_argument("--eval", nargs="*", default=[], choices=["bpd", "fid"], help="sweep: evaluate every result")
    p.add_argument("--eval-images", type=int, default=256, help="validation images for the bits/dim estimate")
    p.add_argument("--eval-timesteps", type=int, default=50, help="timestep strata of the bits/dim estimate")
    p.add_argument("--features", default=None, help="feature network for --eval fid (as train.eval_features)")
    p.add_argument("--reference", default=None, help="reference statistics .npz for --eval fid")
    p.add_argument("--fid-samples", type=int, default=2000, help="samples per model for --eval fid")
    p.add_argument("--fid-steps", default=None, help="respacing of the FID samples (default: train.eval_sample_steps)")
    p.add_argument("--data-root", default=None, help="shards of the validation split (default: the run's)")
    p.add_argument("--timeout-min", dest="timeout_min", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
