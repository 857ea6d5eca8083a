"""I-JEPA multi-block masker: invariants, sampling distribution, determinism and up-front validation.

The reference sampler's flaws (docs/IJEPA.md) each have a test that fails on a sampler that has them:
positions that never reach the last row/column (flaw 1), scale and aspect from one draw (flaw 2),
unbounded retries / no up-front validation (flaw 3), silently dropping the no-overlap rule (flaw 4).
"""

from __future__ import annotations

import math
import random
import time
import warnings

import numpy as np
import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jepa_image.masking import MultiBlockConfig, MultiBlockMasker

from jepa.components import Mask, Masker
from jepa.errors import JepaError, MaskConfigError

IJEPA = MultiBlockConfig()  # the reference configuration (docs/IJEPA.md, "masks")

# (grid, config) pairs the invariants are checked on; none of them clamps a target block.
CASES = [
    ((8, 8), IJEPA),
    ((14, 14), IJEPA),
    ((16, 16), IJEPA),
    ((32, 32), IJEPA),
    ((8, 16), MultiBlockConfig(context_aspect=(0.5, 0.5))),
    ((12, 5), MultiBlockConfig(target_aspect=(1.5, 3.0), context_aspect=(2.4, 2.4))),
    ((14, 14), MultiBlockConfig(num_targets=2, target_scale=(0.05, 0.3), target_aspect=(0.35, 2.5),
                                context_scale=(0.4, 0.7), context_aspect=(0.75, 1.33), min_keep=5)),
    ((20, 9), MultiBlockConfig(num_targets=6, target_scale=(0.02, 0.1), target_aspect=(0.5, 4.0),
                               context_scale=(0.6, 0.6), context_aspect=(2.0, 2.0), min_keep=20)),
]


def make(**kw) -> MultiBlockMasker:
    return MultiBlockMasker(MultiBlockConfig(**kw))


# ---------------------------------------------------------------------------------------- helpers


def rectangle(idx: torch.Tensor, W: int) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of a set of flat indices, asserting that it is a full rectangle."""
    r, c = (idx // W).tolist(), (idx % W).tolist()
    top, left = min(r), min(c)
    h, w = max(r) - top + 1, max(c) - left + 1
    assert len(set(idx.tolist())) == h * w == idx.numel(), "target is not a full rectangle"
    return top, left, h, w


def size_reachable(h: int, w: int, grid, scale, aspect) -> bool:
    """Exactly: is there a scale s in ``scale`` and an aspect a in ``aspect`` for which the sampler's
    rule (rows = round(sqrt(s*N*a)), cols = round(sqrt(s*N/a)), clamped to the grid) yields h x w?

    With x = sqrt(s*N*a), y = sqrt(s*N/a): x*y = s*N and x/y = a. In logs (u = ln x, v = ln y) all
    constraints are intervals on u, v, u+v, u-v, so feasibility is a 2-D linear program: the width of
    the v-interval allowed at a given u is concave piecewise-linear in u, and its maximum lies at an
    end of the u-range or at a crossing of two bounds.
    """
    H, W = grid
    N = H * W
    big = 50.0
    U0 = math.log(h - 0.5) if h > 1 else -big  # h == 1 may also be a clamp from 0
    U1 = big if h == H else math.log(h + 0.5)  # h == H may be a clamp from above
    V0 = math.log(w - 0.5) if w > 1 else -big
    V1 = big if w == W else math.log(w + 0.5)
    P0, P1 = math.log(scale[0] * N), math.log(scale[1] * N)
    Q0, Q1 = math.log(aspect[0]), math.log(aspect[1])
    for u in (U0, U1, P0 - V0, V0 + Q1, (P0 + Q1) / 2, P1 - V1, V1 + Q0, (P1 + Q0) / 2):
        u = min(max(u, U0), U1)
        if max(V0, P0 - u, u - Q1) <= min(V1, P1 - u, u - Q0) + 1e-9:
            return True
    return False


def target_tolerances(grid, cfg: MultiBlockConfig) -> tuple[float, float, float, float]:
    """Bounds on a target's area / N and rows / cols implied by the configured ranges and rounding.

    With x*y = s*N, x/y = a and h, w within 0.5 of x, y: h*w = s*N +- (x+y)/2 + 1/4 and
    x + y = sqrt(s*N) * (sqrt(a) + 1/sqrt(a)), so the area deviates by at most that over the range.
    h/w lies in [(x-1/2)/(y+1/2), (x+1/2)/(y-1/2)]; both ends are monotone in s and a, with extremes at
    the smallest scale and the extreme aspects.
    """
    N = grid[0] * grid[1]
    (s0, s1), (a0, a1) = cfg.target_scale, cfg.target_aspect
    g = max(math.sqrt(a) + 1 / math.sqrt(a) for a in (a0, a1))
    area_lo = (s0 * N - math.sqrt(s0 * N) * g / 2 + 0.25) / N
    area_hi = (s1 * N + math.sqrt(s1 * N) * g / 2 + 0.25) / N
    x, y = math.sqrt(s0 * N * a0), math.sqrt(s0 * N / a0)
    ratio_lo = (x - 0.5) / (y + 0.5)
    x, y = math.sqrt(s0 * N * a1), math.sqrt(s0 * N / a1)
    ratio_hi = (x + 0.5) / (y - 0.5) if y > 0.5 else math.inf
    return area_lo, area_hi, ratio_lo, ratio_hi


def assert_valid(mask: Mask, grid, cfg: MultiBlockConfig) -> None:
    H, W = grid
    N = H * W
    assert isinstance(mask, Mask)
    assert len(mask.targets) == cfg.num_targets
    union: set[int] = set()
    for t in [mask.context, *mask.targets]:
        assert t.dtype == torch.int64 and t.dim() == 1 and t.numel() > 0
        assert bool((t[1:] > t[:-1]).all()), "indices must be sorted and unique"
        assert 0 <= int(t[0]) and int(t[-1]) < N
    ctx = set(mask.context.tolist())
    assert len(ctx) >= cfg.min_keep
    for t in mask.targets:
        tset = set(t.tolist())
        assert not (ctx & tset), "context overlaps a target"
        union |= tset
        _, _, h, w = rectangle(t, W)
        assert size_reachable(h, w, grid, cfg.target_scale, cfg.target_aspect), (h, w)
    # the context is a context block minus the targets: every cell of its bounding box that is not
    # context is covered by a target, and the box fits the largest reachable context block
    r, c = (mask.context // W).tolist(), (mask.context % W).tolist()
    top, left, bottom, right = min(r), min(c), max(r), max(c)
    box = {rr * W + cc for rr in range(top, bottom + 1) for cc in range(left, right + 1)}
    assert box - ctx <= union, "context has a hole that no target explains"
    s1, (a0, a1) = cfg.context_scale[1], cfg.context_aspect
    assert bottom - top + 1 <= min(H, round(math.sqrt(s1 * N * a1)))
    assert right - left + 1 <= min(W, round(math.sqrt(s1 * N / a0)))


def key(mask: Mask) -> tuple:
    return (tuple(mask.context.tolist()), *(tuple(t.tolist()) for t in mask.targets))


# ---------------------------------------------------------------------------------------- API / config


def test_public_api():
    m = MultiBlockMasker(IJEPA)
    assert isinstance(m, Masker)
    assert MultiBlockMasker.Config is MultiBlockConfig
    assert "multi-block" in MultiBlockMasker.summary
    assert m.num_targets == 4 and make(num_targets=7).num_targets == 7
    assert IJEPA.target_scale == (0.15, 0.2) and IJEPA.target_aspect == (0.75, 1.5)
    assert IJEPA.context_scale == (0.85, 1.0) and IJEPA.context_aspect == (1.0, 1.0)
    assert IJEPA.min_keep == 10 and IJEPA.num_targets == 4 and IJEPA.max_attempts == 50


def test_config_coerces_toml_lists_and_is_frozen():
    cfg = MultiBlockConfig(target_scale=[0.1, 0.2], context_aspect=[1, 2])
    assert cfg.target_scale == (0.1, 0.2) and cfg.context_aspect == (1.0, 2.0)
    with pytest.raises(pydantic.ValidationError):
        cfg.num_targets = 3


@pytest.mark.parametrize("kw, field", [
    (dict(target_scale=(0.3, 0.2)), "target_scale"),
    (dict(target_scale=(0.0, 0.2)), "target_scale"),
    (dict(context_scale=(0.9, 1.1)), "context_scale"),
    (dict(context_scale=(-0.1, 0.5)), "context_scale"),
    (dict(target_scale=(float("nan"), 0.2)), "target_scale"),
    (dict(target_aspect=(1.5, 0.75)), "target_aspect"),
    (dict(target_aspect=(0.0, 1.0)), "target_aspect"),
    (dict(context_aspect=(1.0, float("inf"))), "context_aspect"),
    (dict(target_scale=(0.1, 0.2, 0.3)), "target_scale"),
    (dict(num_targets=0), "num_targets"),
    (dict(min_keep=0), "min_keep"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(allow_overlap=True), "allow_overlap"),
])
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(pydantic.ValidationError) as exc:
        MultiBlockConfig(**kw)
    assert any(field in map(str, e["loc"]) for e in exc.value.errors())


# ---------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("grid, cfg", CASES, ids=[f"{g[0]}x{g[1]}-{i}" for i, (g, _) in enumerate(CASES)])
def test_invariants_over_many_seeds(grid, cfg):
    m = MultiBlockMasker(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these configurations clamps a block
        m.check(grid)
    area_lo, area_hi, ratio_lo, ratio_hi = target_tolerances(grid, cfg)
    N = grid[0] * grid[1]
    for seed in range(250):
        mask = m(grid, random.Random(seed))
        assert_valid(mask, grid, cfg)
        for t in mask.targets:
            _, _, h, w = rectangle(t, grid[1])
            assert area_lo <= h * w / N <= area_hi
            assert ratio_lo <= h / w <= ratio_hi


def test_size_reachable_helper_rejects_wrong_sizes():
    # the exact size check is what catches a wrong scale/aspect rule, so make sure it can say no
    grid, cfg = (14, 14), IJEPA
    assert size_reachable(6, 5, grid, cfg.target_scale, cfg.target_aspect)  # 30 tokens, aspect 1.2
    assert size_reachable(5, 5, grid, cfg.target_scale, cfg.target_aspect)  # 5.5 * 5.5 >= 0.15 * 196
    assert not size_reachable(4, 6, grid, cfg.target_scale, cfg.target_aspect)  # 4.5 * 6.5 < 0.15 * 196
    assert not size_reachable(8, 8, grid, cfg.target_scale, cfg.target_aspect)  # 64 tokens: too big
    assert not size_reachable(10, 3, grid, cfg.target_scale, cfg.target_aspect)  # aspect 3.3: too tall
    assert not size_reachable(4, 8, grid, cfg.target_scale, cfg.target_aspect)  # aspect 0.5: too wide


def test_context_never_overlaps_targets_even_when_tight():
    # a configuration where many draws fail: retries must keep every constraint (no silent relaxation)
    grid, cfg = (8, 8), MultiBlockConfig(target_scale=(0.4, 0.5))
    m = MultiBlockMasker(cfg)
    for seed in range(300):
        assert_valid(m(grid, random.Random(seed)), grid, cfg)


# ---------------------------------------------------------------------------------------- positions


@pytest.mark.filterwarnings("ignore:.*clamped")  # a wide aspect range clamps some context blocks
@pytest.mark.parametrize("grid", [(14, 14), (8, 16), (12, 5)])
def test_every_row_and_column_is_reachable(grid):
    H, W = grid
    cfg = MultiBlockConfig(num_targets=2, target_scale=(0.05, 0.15), target_aspect=(0.5, 2.0),
                           context_scale=(0.3, 0.5), context_aspect=(0.75, 1.5), min_keep=1)
    m = MultiBlockMasker(cfg)
    seen_ctx = np.zeros(H * W, bool)
    seen_tgt = np.zeros(H * W, bool)
    for seed in range(1500):
        mask = m(grid, random.Random(seed))
        seen_ctx[mask.context.numpy()] = True
        for t in mask.targets:
            seen_tgt[t.numpy()] = True
    for name, seen in (("context", seen_ctx), ("target", seen_tgt)):
        seen = seen.reshape(H, W)
        assert seen[H - 1].any() and seen[:, W - 1].any(), f"{name} never reaches the last row/column"
        assert seen.all(), f"{name} never covers cells {np.argwhere(~seen).tolist()}"


@pytest.mark.filterwarnings("ignore:.*clamped")
@pytest.mark.parametrize("grid", [(14, 14), (8, 16)])
def test_target_corner_is_uniform_over_the_full_range(grid):
    # for a block of h rows, P(top == H - h) = P(top == 0) = 1 / (H - h + 1); the reference's
    # exclusive bound makes the first probability 0
    H, W = grid
    m = make(target_aspect=(0.5, 2.0), min_keep=1)
    exp_bottom = exp_right = exp_top = 0.0
    n_bottom = n_right = n_top = 0
    for seed in range(1000):
        for t in m(grid, random.Random(seed)).targets:
            top, left, h, w = rectangle(t, W)
            exp_bottom += 1 / (H - h + 1)
            exp_top += 1 / (H - h + 1)
            exp_right += 1 / (W - w + 1)
            n_bottom += top == H - h
            n_top += top == 0
            n_right += left == W - w
    for n, e in ((n_bottom, exp_bottom), (n_top, exp_top), (n_right, exp_right)):
        assert abs(n - e) < 5 * math.sqrt(e), (n, e)


# ---------------------------------------------------------------------------------------- distribution


def _stats(sizes):
    area = np.array([h * w for h, w in sizes], float)
    log_ratio = np.log([h / w for h, w in sizes])
    return area, log_ratio


def test_scale_and_aspect_are_independent():
    grid = (32, 32)
    N = 32 * 32
    cfg = MultiBlockConfig(num_targets=1, target_scale=(0.05, 0.4), target_aspect=(0.5, 2.0),
                           context_scale=(0.9, 1.0), min_keep=1)
    m = MultiBlockMasker(cfg)
    sizes = [rectangle(m(grid, random.Random(s)).targets[0], 32)[2:] for s in range(3000)]
    area, log_ratio = _stats(sizes)
    r = np.corrcoef(area, log_ratio)[0, 1]
    assert abs(r) < 0.1, f"target area and aspect are correlated (r={r:.3f})"
    # scale uniform on (0.05, 0.4): mean 0.225
    assert abs(area.mean() / N - 0.225) < 0.01
    # aspect log-uniform on (0.5, 2): tall and wide equally likely (a uniform draw would give 2:1)
    tall, wide = int((log_ratio > 0).sum()), int((log_ratio < 0).sum())
    assert 0.8 < tall / wide < 1.25, (tall, wide)

    # control: the reference's single draw for scale and aspect is detected by the same statistic
    rng = random.Random(0)
    coupled = []
    for _ in range(3000):
        u = rng.random()
        s = 0.05 + 0.35 * u
        a = math.exp(math.log(0.5) + math.log(4.0) * u)
        coupled.append((round(math.sqrt(s * N * a)), round(math.sqrt(s * N / a))))
    area_c, log_ratio_c = _stats(coupled)
    assert np.corrcoef(area_c, log_ratio_c)[0, 1] > 0.5


# ---------------------------------------------------------------------------------------- determinism


def test_deterministic_per_seed():
    grid = (14, 14)
    checked, fresh = MultiBlockMasker(IJEPA), MultiBlockMasker(IJEPA)
    checked.check(grid)  # the check's own seeded draws must not change any sample
    for seed in range(20):
        a = key(checked(grid, random.Random(seed)))
        b = key(fresh(grid, random.Random(seed)))
        assert a == b
    masks = {key(fresh(grid, random.Random(seed))) for seed in range(200)}
    assert len(masks) == 200


def test_uses_only_the_given_rng():
    grid = (14, 14)
    m = MultiBlockMasker(IJEPA)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a = key(m(grid, random.Random(7)))
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    assert key(m(grid, random.Random(7))) == a


def test_masks_are_independent_tensors():
    grid = (8, 8)
    m = MultiBlockMasker(MultiBlockConfig(context_aspect=(1.0, 1.0), target_scale=(0.2, 0.2)))
    first = m(grid, random.Random(0))
    before = key(m(grid, random.Random(1)))
    first.context.fill_(-1)
    for t in first.targets:
        t.fill_(-1)
    assert key(m(grid, random.Random(1))) == before


# ---------------------------------------------------------------------------------------- validation


def _timed_check(m: MultiBlockMasker, grid) -> MaskConfigError:
    t0 = time.perf_counter()
    with pytest.raises(MaskConfigError) as exc:
        m.check(grid)
    assert time.perf_counter() - t0 < 1.0
    return exc.value


@pytest.mark.parametrize("grid, kw, field", [
    ((14, 14), dict(min_keep=200), "masker.min_keep"),
    ((3, 3), dict(), "masker.min_keep"),  # 10 context tokens on 9 cells
    ((8, 8), dict(context_scale=(0.05, 0.1)), "masker.min_keep"),  # context block of at most 9 tokens
    ((4, 4), dict(target_scale=(0.01, 0.02)), "masker.target_scale"),  # 0.16 of a token
    ((8, 8), dict(context_scale=(0.001, 0.002)), "masker.context_scale"),
    ((8, 8), dict(target_scale=(0.1, 0.1), target_aspect=(0.01, 0.01)), "masker.target_aspect"),
    ((8, 8), dict(target_scale=(0.6, 0.7)), "masker.min_keep"),  # the targets eat the context
    ((4, 4), dict(), "masker.min_keep"),  # I-JEPA masks on a 64 px image: the reference loops forever
])
def test_infeasible_configs_fail_fast_with_a_clear_message(grid, kw, field):
    err = _timed_check(make(**kw), grid)
    msg = str(err)
    assert isinstance(err, JepaError)
    assert msg.startswith(field + ":"), msg
    assert f"{grid[0]}x{grid[1]}" in msg and "\n" not in msg


def test_low_success_rate_reports_the_rate_and_the_attempts_needed():
    # about 65% of draws succeed: fine with 50 attempts, far too risky with 5
    grid = (8, 8)
    msg = str(_timed_check(make(target_scale=(0.4, 0.5), max_attempts=5), grid))
    assert "%" in msg and "max_attempts" in msg
    needed = int(msg.rsplit("at least ", 1)[1])
    assert 5 < needed <= 50
    m = make(target_scale=(0.4, 0.5), max_attempts=needed)
    m.check(grid)
    for seed in range(100):
        assert_valid(m(grid, random.Random(seed)), grid, m.cfg)


@pytest.mark.parametrize("grid", [(196,), (2, 3, 4), (0, 5), ()])
def test_grid_must_be_2d(grid):
    err = _timed_check(MultiBlockMasker(IJEPA), grid)
    assert "2-D" in str(err)
    with pytest.raises(MaskConfigError):
        MultiBlockMasker(IJEPA)(grid, random.Random(0))


def test_call_on_an_infeasible_grid_raises_instead_of_hanging():
    m = MultiBlockMasker(IJEPA)
    t0 = time.perf_counter()
    for _ in range(3):  # cached: the same error every time
        with pytest.raises(MaskConfigError, match="masker.min_keep"):
            m((4, 4), random.Random(0))
    assert time.perf_counter() - t0 < 1.0
    m((14, 14), random.Random(0))  # other grids are unaffected


def test_exhausted_attempts_raise_without_relaxing():
    class Constant(random.Random):
        """Always draws the largest values: the only target covers the whole context block."""

        calls = 0

        def random(self):
            self.calls += 1
            return 0.999999

    cfg = MultiBlockConfig(num_targets=1, target_scale=(0.1, 0.9), target_aspect=(1.0, 1.0),
                           context_scale=(0.9, 0.9), min_keep=1, max_attempts=20)
    m = MultiBlockMasker(cfg)
    m.check((8, 8))  # feasible: random draws rarely fail
    rng = Constant()
    with pytest.raises(MaskConfigError, match="max_attempts=20"):
        m((8, 8), rng)
    assert rng.calls == 20 * 4 * 2  # 20 attempts of 2 blocks, 4 draws per block, then stop


def test_feasible_configs_pass_quietly_and_check_is_cached():
    m = MultiBlockMasker(IJEPA)
    for grid in [(6, 6), (8, 8), (14, 14), (16, 16), (32, 32), (64, 64)]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m.check(grid)
        assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    for _ in range(1000):
        m.check((14, 14))
    assert time.perf_counter() - t0 < 0.05


def test_clamped_blocks_warn():
    # a scale-1 square context block does not fit an 8x16 grid
    with pytest.warns(UserWarning, match="clamped"):
        MultiBlockMasker(IJEPA).check((8, 16))


# ---------------------------------------------------------------------------------------- property


@st.composite
def grids_and_configs(draw):
    H, W = draw(st.integers(1, 20)), draw(st.integers(1, 20))

    def rng_range(lo, hi):
        a = draw(st.floats(lo, hi))
        return (a, draw(st.floats(a, hi)))

    def aspect():
        a = draw(st.floats(0.2, 3.0))
        return (a, a * draw(st.floats(1.0, 4.0)))

    cfg = MultiBlockConfig(num_targets=draw(st.integers(1, 5)), target_scale=rng_range(0.01, 0.6),
                           target_aspect=aspect(), context_scale=rng_range(0.1, 1.0), context_aspect=aspect(),
                           min_keep=draw(st.integers(1, 40)), max_attempts=draw(st.integers(1, 100)))
    return (H, W), cfg, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(grids_and_configs())
def test_property_check_or_valid(case):
    grid, cfg, seed = case
    m = MultiBlockMasker(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clamped blocks only warn
        try:
            m.check(grid)
        except MaskConfigError as err:
            assert time.perf_counter() - t0 < 1.0
            assert str(err).startswith("masker.") and f"{grid[0]}x{grid[1]}" in str(err)
            return
    for i in range(50):
        assert_valid(m(grid, random.Random(seed + i)), grid, cfg)
