"""I-JEPA multi-block masking on a 2-D token grid, without the reference sampler's flaws.

One sample is drawn as ``num_targets`` target blocks (which may overlap each other) and one large
context block; the context is the context block minus the union of the targets. Every block draws its
scale and its aspect ratio independently (scale uniform, aspect log-uniform), and its top-left corner
uniformly over the *full* valid range, so blocks reach the last row and column. A sample that keeps
fewer than ``min_keep`` context tokens is redrawn as a whole, at most ``max_attempts`` times; the
"no overlap between context and targets" constraint is never relaxed. :meth:`MultiBlockMasker.check`
validates a configuration against a grid up front (analytically, then with a short seeded
Monte-Carlo estimate) so an infeasible configuration fails in milliseconds instead of hanging or
failing at random mid-training.

Tokens are flat row-major indices ``r * W + c`` of the grid ``(H, W)``.
"""

from __future__ import annotations

import math
import operator
import random
import warnings

import numpy as np
import torch
from pydantic import Field, field_validator

from jepa.components import ComponentConfig, Mask, Masker
from jepa.errors import MaskConfigError

__all__ = ["MultiBlockConfig", "MultiBlockMasker"]

#: Monte-Carlo draws used by :meth:`MultiBlockMasker.check` (fixed seed, so the verdict is reproducible).
CHECK_DRAWS = 256
#: Largest accepted probability that one sample exhausts ``max_attempts`` (estimated by ``check``).
#: A training run draws ~1e8-1e9 masks and one exhausted sample stops it, so this must be tiny: a
#: per-attempt success rate of 10% with 50 attempts would still fail one sample in ~200.
MAX_FAILURE_PROBABILITY = 1e-9


def _range_str(r: tuple[float, float]) -> str:
    return f"({r[0]:g}, {r[1]:g})"


class MultiBlockConfig(ComponentConfig):
    """Settings of the I-JEPA multi-block masker (the ``[masker]`` section of a recipe)."""

    num_targets: int = Field(4, ge=1, description="Target blocks per sample.")
    target_scale: tuple[float, float] = Field(
        (0.15, 0.2), description="Fraction of the grid's tokens one target block covers, drawn uniformly in [lo, hi].")
    target_aspect: tuple[float, float] = Field(
        (0.75, 1.5), description="Height / width of a target block, drawn log-uniformly in [lo, hi].")
    context_scale: tuple[float, float] = Field(
        (0.85, 1.0), description="Fraction of the grid the context block covers, before the targets are removed.")
    context_aspect: tuple[float, float] = Field((1.0, 1.0), description="Height / width of the context block.")
    min_keep: int = Field(10, ge=1, description="Minimum context tokens left after removing the targets.")
    max_attempts: int = Field(50, ge=1, description="Redraws of a whole sample before giving up with an error "
                              "(never by relaxing a constraint).")

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _check_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi <= 1.0):
            raise ValueError(f"must be (lo, hi) with 0 < lo <= hi <= 1, got {_range_str(v)}")
        return (float(lo), float(hi))

    @field_validator("target_aspect", "context_aspect")
    @classmethod
    def _check_aspect(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi):
            raise ValueError(f"must be (lo, hi) with 0 < lo <= hi (height / width), got {_range_str(v)}")
        return (float(lo), float(hi))


class _GridPlan:
    """Everything about one (config, grid) pair that does not change between samples."""

    __slots__ = ("H", "W", "N", "index", "target", "context", "error")

    def __init__(self, H: int, W: int, target: tuple, context: tuple):
        self.H, self.W, self.N = H, W, H * W
        self.index = np.arange(self.N, dtype=np.int64).reshape(H, W)
        self.target = target  # (scale lo, scale span, log-aspect lo, log-aspect span)
        self.context = context
        self.error: str | None = None  # set when check() rejected this grid


def _block_params(scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[float, float, float, float]:
    la_lo, la_hi = math.log(aspect[0]), math.log(aspect[1])
    return (scale[0], scale[1] - scale[0], la_lo, la_hi - la_lo)


def _block_size(s: float, a: float, H: int, W: int) -> tuple[int, int]:
    """Unclamped (rows, cols) of a block of scale ``s`` and aspect ``a`` on an ``H x W`` grid."""
    n = s * H * W
    return round(math.sqrt(n * a)), round(math.sqrt(n / a))


class MultiBlockMasker(Masker):
    """I-JEPA multi-block masker (see the module docstring for the sampling rules)."""

    Config = MultiBlockConfig
    summary = "I-JEPA multi-block masking: one large context block, several target blocks removed from it"

    def __init__(self, cfg: MultiBlockConfig):
        if not isinstance(cfg, MultiBlockConfig):
            cfg = MultiBlockConfig.model_validate(cfg)
        super().__init__(cfg)
        self._plans: dict[tuple[int, int], _GridPlan] = {}

    @property
    def num_targets(self) -> int:  # type: ignore[override]
        return self.cfg.num_targets

    # ------------------------------------------------------------------ validation

    def _grid_name(self, grid) -> str:
        return "x".join(str(g) for g in grid)

    def _plan(self, grid) -> _GridPlan:
        """The cached plan of ``grid``, validating the grid (and raising its error) on first use."""
        key = grid if type(grid) is tuple else tuple(grid)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build_plan(key)
            self._plans[key] = plan
        if plan.error is not None:
            raise MaskConfigError(plan.error)
        return plan

    def _build_plan(self, grid: tuple) -> _GridPlan:
        cfg = self.cfg
        try:
            sizes = [operator.index(g) for g in grid]
        except TypeError:
            sizes = []
        if len(grid) != 2 or len(sizes) != 2 or min(sizes) < 1:
            raise MaskConfigError(
                f"masker: multiblock masking needs a 2-D (rows, cols) grid of positive sizes, got grid {grid!r}")
        H, W = sizes
        plan = _GridPlan(H, W, _block_params(cfg.target_scale, cfg.target_aspect),
                         _block_params(cfg.context_scale, cfg.context_aspect))
        plan.error = self._diagnose(plan)
        return plan

    def _diagnose(self, plan: _GridPlan) -> str | None:
        """One-line error for an infeasible configuration on ``plan``'s grid, else ``None``."""
        cfg, H, W, N = self.cfg, plan.H, plan.W, plan.N
        g = f"{H}x{W}"

        # 1. every block size reachable: the smallest draws must still round to >= 1 row and column.
        for kind, scale, aspect in (("target", cfg.target_scale, cfg.target_aspect),
                                    ("context", cfg.context_scale, cfg.context_aspect)):
            h_min = _block_size(scale[0], aspect[0], H, W)[0]  # fewest rows: smallest scale, flattest
            w_min = _block_size(scale[0], aspect[1], H, W)[1]  # fewest cols: smallest scale, tallest
            if min(_block_size(scale[0], 1.0, H, W)) < 1 or (h_min < 1 and w_min < 1):
                return (f"masker.{kind}_scale: a {kind} block of scale {scale[0]:g} on a {g} grid is smaller "
                        f"than one token ({scale[0] * N:.3g} tokens); raise the lower bound of {kind}_scale "
                        f"to at least {1.0 / N:.3g}")
            if h_min < 1 or w_min < 1:
                a = aspect[0] if h_min < 1 else aspect[1]
                side = "row" if h_min < 1 else "column"
                return (f"masker.{kind}_aspect: a {kind} block of scale {scale[0]:g} and aspect {a:g} on a {g} "
                        f"grid is less than one {side} thick; narrow {kind}_aspect "
                        f"{_range_str(aspect)} or raise {kind}_scale")
            # warn-level: the largest blocks do not fit and are clamped to the grid
            h_max = _block_size(scale[1], aspect[1], H, W)[0]
            w_max = _block_size(scale[1], aspect[0], H, W)[1]
            if h_max > H or w_max > W:
                warnings.warn(f"masker.{kind}_scale/{kind}_aspect: the largest {kind} blocks (up to {h_max} "
                              f"rows or {w_max} cols) do not fit the {g} grid and are clamped to it, so they "
                              "cover less than the configured scale", UserWarning, stacklevel=2)

        # 2. enough tokens for the context at all.
        if cfg.min_keep > N:
            return (f"masker.min_keep: {cfg.min_keep} context tokens cannot be kept on a {g} grid of {N} "
                    "tokens; lower min_keep")
        ctx_h = min(H, _block_size(cfg.context_scale[1], cfg.context_aspect[1], H, W)[0])
        ctx_w = min(W, _block_size(cfg.context_scale[1], cfg.context_aspect[0], H, W)[1])
        if ctx_h * ctx_w < cfg.min_keep:
            return (f"masker.min_keep: {cfg.min_keep} context tokens cannot be kept on a {g} grid: the context "
                    f"block (context_scale {_range_str(cfg.context_scale)}) covers at most {ctx_h * ctx_w} "
                    "tokens; lower min_keep or raise context_scale")

        # 3. a sample that can never fail needs no estimate: the smallest context block minus the
        #    largest possible targets still keeps min_keep tokens.
        t_h = min(H, _block_size(cfg.target_scale[1], cfg.target_aspect[1], H, W)[0])
        t_w = min(W, _block_size(cfg.target_scale[1], cfg.target_aspect[0], H, W)[1])
        c_h = min(H, _block_size(cfg.context_scale[0], cfg.context_aspect[0], H, W)[0])
        c_w = min(W, _block_size(cfg.context_scale[0], cfg.context_aspect[1], H, W)[1])
        if c_h * c_w - cfg.num_targets * t_h * t_w >= cfg.min_keep:
            return None

        # 4. otherwise a valid context must be likely enough per attempt: seeded Monte-Carlo estimate
        #    of the per-attempt failure rate, taken at a conservative upper bound (~2 sigma, and at least
        #    3/n when no draw failed, the "rule of three"), so that a lucky estimate does not pass a
        #    configuration that then fails mid-training.
        rnd = random.Random(0).random
        ok = sum(self._attempt(plan, rnd)[0] is not None for _ in range(CHECK_DRAWS))
        rate = ok / CHECK_DRAWS
        q = 1.0 - rate
        q_up = min(1.0, q + 2.0 * math.sqrt(q * (1.0 - q) / CHECK_DRAWS) + 3.0 / CHECK_DRAWS)
        p_fail = q_up ** cfg.max_attempts
        if p_fail > MAX_FAILURE_PROBABILITY:
            hint = ""
            if q_up < 1.0:
                need = math.ceil(math.log(MAX_FAILURE_PROBABILITY) / math.log(q_up))
                hint = f", or raise max_attempts to at least {need}"
            return (f"masker.min_keep: only {ok}/{CHECK_DRAWS} ({rate:.0%}) of draws on a {g} grid keep "
                    f"{cfg.min_keep} context tokens once the {cfg.num_targets} target blocks "
                    f"(target_scale {_range_str(cfg.target_scale)}) are removed from the context block "
                    f"(context_scale {_range_str(cfg.context_scale)}), so a sample could exhaust "
                    f"max_attempts={cfg.max_attempts} (failure probability up to {p_fail:.2g} per sample); "
                    f"lower min_keep, num_targets or target_scale, raise context_scale{hint}")
        return None

    def check(self, grid: tuple[int, ...]) -> None:
        """Raise :class:`MaskConfigError` (one line naming the field and the grid) if masks on ``grid``
        are impossible or too unlikely. Cached per grid; takes a few milliseconds the first time."""
        self._plan(grid)

    # ------------------------------------------------------------------ sampling

    @staticmethod
    def _draw(params: tuple, H: int, W: int, rnd) -> tuple[int, int, int, int]:
        """(top, left, rows, cols) of one block: scale and aspect independent, position uniform."""
        s_lo, s_span, la_lo, la_span = params
        n = (s_lo + s_span * rnd()) * H * W
        a = math.exp(la_lo + la_span * rnd())
        h = round(math.sqrt(n * a))
        w = round(math.sqrt(n / a))
        h = 1 if h < 1 else (H if h > H else h)
        w = 1 if w < 1 else (W if w > W else w)
        # int(u * k) with u in [0, 1) is uniform on 0..k-1: every top in [0, H-h], left in [0, W-w]
        return int(rnd() * (H - h + 1)), int(rnd() * (W - w + 1)), h, w

    def _attempt(self, plan: _GridPlan, rnd):
        """One draw of all blocks: (context indices or None if too small, target blocks)."""
        H, W, draw = plan.H, plan.W, self._draw
        tp = plan.target
        blocks = [draw(tp, H, W, rnd) for _ in range(self.cfg.num_targets)]
        ct, cl, ch, cw = draw(plan.context, H, W, rnd)
        keep = np.zeros((H, W), dtype=bool)
        keep[ct:ct + ch, cl:cl + cw] = True
        for t, lf, h, w in blocks:
            keep[t:t + h, lf:lf + w] = False
        context = plan.index[keep]  # row-major order: sorted, unique
        if context.shape[0] < self.cfg.min_keep:
            return None, blocks
        return context, blocks

    def __call__(self, grid: tuple[int, ...], rng: random.Random) -> Mask:
        plan = self._plan(grid)
        rnd = rng.random
        for _ in range(self.cfg.max_attempts):
            context, blocks = self._attempt(plan, rnd)
            if context is not None:
                index = plan.index
                return Mask(context=torch.from_numpy(context),
                            targets=[torch.from_numpy(index[t:t + h, lf:lf + w].flatten()) for t, lf, h, w in blocks])
        raise MaskConfigError(
            f"masker.min_keep: no draw in max_attempts={self.cfg.max_attempts} kept {self.cfg.min_keep} context "
            f"tokens on a {plan.H}x{plan.W} grid; lower min_keep, num_targets or target_scale, or raise "
            "context_scale or max_attempts")
