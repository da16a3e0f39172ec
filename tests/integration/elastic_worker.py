"""One rank of an elastic-resume run for ``test_elastic_engine.py`` (started with RANK, WORLD_SIZE, ... set).

``save ROOT CASES``: for each case (ZeRO stage, bf16) train a tiny model a few steps with an EMA, write the
DeepSpeed checkpoint, each rank's EMA state and (rank 0) a reference of the full training state.
``load ROOT CASES``: for each case rebuild the engine from other random weights, resume with
``trainer.elastic.load_engine_state`` + ``EMA.load_state_dict_resharded``, compare the full state with the
reference bit for bit and take one more step. Each rank writes ``results_<transition>_r<rank>.json``:
case name -> "ok" or the one-line failure. A failing case does not stop the others.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SAVE_STEPS = 3
RATES = [0.9, 0.999]
NEW_RATE = 0.5  # added on resume: must start from the resumed weights
TAG = f"step_{SAVE_STEPS:08d}"


class Tiny(nn.Module):
    """Odd parameter sizes (135, 5, 35, 7, 21, 3) so that ZeRO partitions need padding on 2 and 4 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv(x)).mean(dim=(2, 3))
        return self.fc2(F.silu(self.fc1(h)))


def build(stage: int, bf16: bool, seed: int) -> Any:
    """Engine as trainer/engine.py builds it: torch AdamW + LambdaLR, config dict without 'optimizer'."""
    import deepspeed

    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def train_step(engine: Any, step: int, rank: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + rank)
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(4, 3, 6, 6, generator=g)
    y = torch.randn(4, 3, generator=g)
    loss = F.mse_loss(engine(x.to(dtype)).float(), y)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def _full_hp(engine: Any, key: str | None) -> dict[str, torch.Tensor]:
    """Full fp32 master weights (key None) or Adam state ``key`` per parameter name (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = list(engine.module.named_parameters())
    opt = engine.optimizer
    out: dict[str, torch.Tensor] = {}
    if engine.zero_optimization():
        for n, p in named:
            t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
            out[n] = t.detach().float().cpu().clone()
    elif hasattr(opt, "fp32_groups"):  # ZeRO-0 + bf16: DeepSpeed's (unfused) wrapper with replicated fp32 masters
        names = {id(p): n for n, p in named}
        for low, high in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            for p, q in zip(low, high, strict=True):
                out[names[id(p)]] = (q.data if key is None else opt.optimizer.state[q][key]).detach().float().clone()
    else:  # ZeRO-0 fp32: torch AdamW on the module's own parameters
        for n, p in named:
            out[n] = (p.data if key is None else opt.state[p][key]).detach().float().clone()
    return out


def snapshot(engine: Any, ema: Any) -> dict[str, Any]:
    """The full training state, identical on every rank (collective)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        module = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    steps = sorted({float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s})
    return {
        "module": module,
        "fp32": _full_hp(engine, None),
        "exp_avg": _full_hp(engine, "exp_avg"),
        "exp_avg_sq": _full_hp(engine, "exp_avg_sq"),
        "ema": {str(r): ema.full_state_dict(r) for r in ema.rates},
        "last_epoch": engine.lr_scheduler.last_epoch,
        "lr": [g["lr"] for g in engine.basic_optimizer.param_groups],
        "adam_steps": steps,
        "global_steps": engine.global_steps,
    }


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> str | None:
    if a.keys() != b.keys():
        return f"{what}: names differ"
    for n in a:
        if a[n].shape != b[n].shape or not torch.equal(a[n], b[n]):
            return f"{what}[{n}] differs (max abs {float((a[n].reshape(-1) - b[n].reshape(-1)).abs().max()):.3g})"
    return None


def compare(got: dict[str, Any], ref: dict[str, Any]) -> str | None:
    for key in ("module", "fp32", "exp_avg", "exp_avg_sq"):
        if (d := _diff(got[key], ref[key], key)) is not None:
            return d
    for r in RATES:
        if (d := _diff(got["ema"][str(r)], ref["ema"][str(r)], f"ema {r}")) is not None:
            return d
    # The new rate starts from the resumed weights (the module's working copy, as EMA.update averages).
    if (d := _diff(got["ema"][str(NEW_RATE)], got["module"], f"ema {NEW_RATE} (new rate)")) is not None:
        return d
    for key in ("last_epoch", "lr", "adam_steps", "global_steps"):
        if got[key] != ref[key]:
            return f"{key}: {got[key]} != saved {ref[key]}"
    return None


def save_case(root: Path, case: dict[str, Any], rank: int) -> None:
    from trainer.ema import EMA

    engine = build(case["stage"], case["bf16"], seed=0)
    ema = EMA(engine.module, RATES)
    for step in range(SAVE_STEPS):
        train_step(engine, step, rank)
        ema.update()
    case_dir = root / case["name"]
    engine.save_checkpoint(str(case_dir / "ckpt"), tag=TAG, save_latest=False)
    torch.save(ema.state_dict(), case_dir / f"ema_rank{rank}.pt")
    ref = snapshot(engine, ema)
    if rank == 0:
        torch.save(ref, case_dir / "ref.pt")


def load_case(root: Path, case: dict[str, Any], rank: int, world: int) -> str:
    from trainer.checkpoint import CheckpointError
    from trainer.elastic import load_engine_state
    from trainer.ema import EMA

    case_dir = root / case["name"]
    tag_dir = case_dir / "ckpt" / TAG
    saved_world = case["saved_world"]
    engine = build(case["stage"], case["bf16"], seed=123)  # other initial weights: the load must replace them
    ema = EMA(engine.module, [*RATES, NEW_RATE])
    try:
        load_engine_state(engine, tag_dir, saved_world, world, is_main=rank == 0)
    except CheckpointError as err:
        return f"CheckpointError: {err}"
    states = [torch.load(case_dir / f"ema_rank{r}.pt", weights_only=True) for r in range(saved_world)]
    ema.load_state_dict_resharded(states)
    got = snapshot(engine, ema)
    ref = torch.load(case_dir / "ref.pt", weights_only=True)
    problem = compare(got, ref)
    if case.get("cross_ema"):
        # EMA shadows saved with the other ZeRO-3 setting (3 <-> below 3) reshard onto this engine too.
        cross_dir = root / case["cross_ema"]
        other = EMA(engine.module, RATES)
        other.load_state_dict_resharded(
            [torch.load(cross_dir / f"ema_rank{r}.pt", weights_only=True) for r in range(saved_world)]
        )
        cross_ref = torch.load(cross_dir / "ref.pt", weights_only=True)["ema"]
        for r in RATES:  # collective under ZeRO-3: every rank gathers before any verdict
            d = _diff(other.full_state_dict(r), cross_ref[str(r)], f"ema {r} from {case['cross_ema']}")
            problem = problem or d
    loss = train_step(engine, SAVE_STEPS, rank)  # collective: every rank takes it even after a mismatch
    ema.update()
    after = {
        "last_epoch": engine.lr_scheduler.last_epoch,
        "adam_steps": sorted({float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s}),
        "global_steps": engine.global_steps,
    }
    if problem is not None:
        return problem
    if not math.isfinite(loss):
        return f"loss after resume is {loss}"
    want = {
        "last_epoch": ref["last_epoch"] + 1,
        "adam_steps": [s + 1 for s in ref["adam_steps"]],
        "global_steps": ref["global_steps"] + 1,
    }
    if after != want:
        return f"counters after one more step {after} != {want}"
    return "ok"


def main() -> None:
    mode, root, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    from trainer.distributed import barrier, init_distributed, shutdown

    env = init_distributed()
    results: dict[str, Any] = {}
    for case in cases:
        start = time.perf_counter()
        if mode == "save":
            save_case(root, case, env.rank)
            results[case["name"]] = "ok"
        else:
            try:
                results[case["name"]] = load_case(root, case, env.rank, env.world_size)
            except Exception as err:  # noqa: BLE001 - reported per case; a hang would show as a timeout
                results[case["name"]] = f"{type(err).__name__}: {' '.join(str(err).split())}"
        results[case["name"] + ".seconds"] = round(time.perf_counter() - start, 2)
    out = root / f"results_{mode}_{env.world_size}_r{env.rank}.json"
    out.write_text(json.dumps(results, indent=1))
    barrier()
    shutdown()  # without it gloo aborts the process at exit ("terminate called without an active exception")


if __name__ == "__main__":
    main()
