"""The power-function EMA tracked during training: :class:`PowerEMA`, one float32 shadow per profile.

It is an :class:`trainer.ema.EMA` whose shadows are keyed by σ_rel instead of a decay, so it holds, saves,
re-partitions (elastic resume) and gathers its shadows exactly as the model's EMA does (a ZeRO-3 rank
averages only its own parameter shard). What differs is the step's weight: 1 - β_t with
β_t = (1 - 1/t)^(γ+1) (EDM2 eq. 3, :mod:`trainer.phema.profiles`), where t counts the kept optimizer steps.
t lives on the device and advances by the step's verdict (``keep``: 1 kept, 0 skipped), so a skipped step
neither moves the shadows nor the profile's clock, and the host never reads the verdict for it.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.ema import EMA
from trainer.phema.profiles import sigma_rel_to_gamma


class PowerEMA(EMA):
    def __init__(self, module: torch.nn.Module, sigma_rels: list[float], device: torch.device) -> None:
        super().__init__(module, sigma_rels)
        self.gammas = {s: sigma_rel_to_gamma(s) for s in self.rates}
        # float64: t counts steps exactly far beyond 2^24, and β is computed from it in float64.
        self.t = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def sigma_rels(self) -> list[float]:
        return list(self.rates)

    @torch.no_grad()
    def update(self, keep: torch.Tensor | None = None) -> None:
        self.t += 1.0 if keep is None else keep.to(torch.float64)
        super().update(keep)

    def _step_weight(self, rate: float, keep: torch.Tensor | None) -> torch.Tensor:
        # clamp: before the first kept step t is 0 and 1/t would turn a weight of 0·x into NaN.
        t = self.t.clamp_min(1.0)
        weight = (1.0 - (1.0 - 1.0 / t) ** (self.gammas[rate] + 1.0)).float()
        return weight if keep is None else keep * weight

    def steps(self) -> int:
        """Kept steps averaged so far (reads the device counter: call at a settled step)."""
        return int(self.t.item())

    def full_shapes(self) -> dict[str, list[int]]:
        """Each parameter's full shape (under ZeRO-3 a rank holds a flat, padded slice of it)."""
        return {n: list(p.ds_shape if self.zero3 else p.shape) for n, p in zip(self.names, self._params, strict=True)}

    # -- persistence: the EMA's, plus the profile clock
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "t": self.t.detach().cpu().clone()}

    def _check_profiles(self, state: dict[str, Any]) -> None:
        saved = [float(r) for r in state["rates"]]  # type: ignore[union-attr]
        if sorted(saved) != sorted(self.rates):
            raise ValueError(
                f"train.phema.sigma_rels {self.rates} differ from the checkpoint's {saved}: a power-function "
                "profile cannot be added to or removed from a run in progress"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_profiles(state)
        super().load_state_dict(state)
        self.t.copy_(state["t"])

    def load_state_dict_resharded(self, states: list[dict[str, Any]]) -> None:
        if states:
            self._check_profiles(states[0])
        super().load_state_dict_resharded(states)
        self.t.copy_(states[0]["t"])
