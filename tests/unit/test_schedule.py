"""The AQN sigma schedule: QeRL's code bit for bit for the plan's settings, the documented
extensions (K = 1, 2, other decays, no zero first stage), exact resume, and config errors."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

from aqn_rs._aqn_rs import DECAYS, SigmaScheduler


# --- QeRL, transcribed from trl_trainer/noise_scheduler.py and grpo_trainer.py --------------
def qerl_get_sigma_by_step(step, total_steps, sigma_trend):
    step = min(step, total_steps)

    num_intervals = len(sigma_trend) + 1
    steps_per_interval = total_steps / num_intervals

    interval_id = int(step // steps_per_interval)

    if interval_id == 0:
        return interval_id, 0

    sigma_id = interval_id - 1
    sigma_id = min(sigma_id, len(sigma_trend) - 1)

    sigma = sigma_trend[sigma_id]
    return sigma_id, sigma


def qerl_trend(sigma_start, sigma_end, num_stages):
    sigma_decay_schedule_np = sigma_start * (sigma_end / sigma_start) ** (
        np.arange(num_stages - 1) / (num_stages - 2)
    )
    return sigma_decay_schedule_np.tolist()


# ---------------------------------------------------------------------------------------------

PLAN = [(0.05, 5e-4), (0.001, 1e-5)]  # runs 1E / nvfp4 and 1D
PLAN_STAGES, PLAN_STEPS = 10, 174


@pytest.mark.parametrize("sigma_start,sigma_end", PLAN)
def test_plan_settings_equal_qerl_at_every_step(sigma_start, sigma_end):
    sched = SigmaScheduler(sigma_start, sigma_end, PLAN_STAGES, PLAN_STEPS)
    trend = qerl_trend(sigma_start, sigma_end, PLAN_STAGES)
    assert sched.trend == trend  # float64, bit for bit (== on floats)
    for step in range(0, PLAN_STEPS + 30):
        _, want = qerl_get_sigma_by_step(step, PLAN_STEPS, trend)
        assert sched.sigma(step) == want, step
    assert sched.schedule() == [qerl_get_sigma_by_step(s, PLAN_STEPS, trend)[1] for s in range(PLAN_STEPS + 1)]
    assert sched.sigma(0) == 0.0 and sched.trend[0] == sigma_start
    assert sched.stage(0) == 0 and sched.stage(PLAN_STEPS) == PLAN_STAGES - 1


def test_other_sizes_equal_qerl_with_the_c_library_pow():
    # QeRL's numpy vector power may use SIMD code (SVML on AVX-512) that differs from the C
    # library's pow by 1 ulp for some exponents; ours, like numpy's scalar path and CPython's
    # `**`, is the C library's pow. The stage logic is compared exactly everywhere.
    for total in (1, 2, 7, 100, 116, 174, 1000):
        for k in range(3, 25):
            trend = [0.05 * math.pow(5e-4 / 0.05, i / (k - 2)) for i in range(k - 1)]
            sched = SigmaScheduler(0.05, 5e-4, k, total)
            assert sched.trend == trend
            for step in range(total + 2):
                assert sched.sigma(step) == qerl_get_sigma_by_step(step, total, trend)[1], (total, k, step)


def test_python_float_floor_division_is_reproduced():
    # 87 // (174 / 14) == 6.0 in Python, while floor(87 / (174 / 14)) == 7
    assert 87 // (174 / 14) == 6.0 and math.floor(87 / (174 / 14)) == 7
    sched = SigmaScheduler(0.05, 5e-4, 14, 174)
    assert sched.stage(87) == 6


def test_k1_and_k2():
    one = SigmaScheduler(0.05, 5e-4, 1, 100)  # the only stage is the noiseless one
    assert one.trend == [] and set(one.schedule()) == {0.0} and one.stage(100) == 0
    one = SigmaScheduler(0.05, 5e-4, 1, 100, zero_first_stage=False)
    assert set(one.schedule()) == {0.05}
    two = SigmaScheduler(0.05, 5e-4, 2, 100)  # QeRL divides by K-2 = 0 here; we use sigma_start
    assert two.trend == [0.05]
    assert two.sigma(49) == 0.0 and two.sigma(50) == 0.05 and two.sigma(10**6) == 0.05


def _t(j, m):
    return j / (m - 1) if m > 1 else 0.0


@pytest.mark.parametrize("zero_first", [True, False])
@pytest.mark.parametrize("decay", ["linear", "cosine", "constant", "exponential"])
def test_decay_formulas(decay, zero_first):
    s0, s1, k, total = 0.02, 0.002, 6, 60
    sched = SigmaScheduler(s0, s1, k, total, decay=decay, zero_first_stage=zero_first)
    m = k - 1 if zero_first else k
    ts = [_t(j, m) for j in range(m)]
    if decay == "linear":
        want = [s0 * (1 - t) + s1 * t for t in ts]
    elif decay == "cosine":
        want = [s0 * w + s1 * (1 - w) for w in (0.5 * (1 + math.cos(math.pi * t)) for t in ts)]
    elif decay == "constant":
        want = [s0] * m
    else:
        want = [s0 * math.pow(s1 / s0, t) for t in ts]
    assert sched.trend == want
    if decay != "constant":
        assert sched.trend[0] == s0 and sched.trend[-1] == pytest.approx(s1, rel=1e-15)
    for step in range(total + 1):
        stage = min(int(step // (total / k)), k - 1)
        assert sched.stage(step) == stage
        if zero_first:
            assert sched.sigma(step) == (0.0 if stage == 0 else want[stage - 1])
        else:
            assert sched.sigma(step) == want[stage]
    assert sched.decay == decay and set(DECAYS) == {"exponential", "linear", "cosine", "constant"}


def test_linear_and_cosine_may_increase_or_reach_zero():
    assert SigmaScheduler(0.0, 0.01, 3, 10, decay="linear").trend == [0.0, 0.01]
    assert SigmaScheduler(0.01, 0.0, 3, 10, decay="cosine").trend == [0.01, 0.0]
    assert set(SigmaScheduler(0.0, 0.0, 4, 10).schedule()) == {0.0}  # exponential of zeros


def test_state_dict_resume_is_exact():
    a = SigmaScheduler(0.001, 1e-5, 10, 174, decay="exponential")
    state = a.state_dict()
    assert state == {
        "version": 1,
        "sigma_start": 0.001,
        "sigma_end": 1e-5,
        "num_stages": 10,
        "total_steps": 174,
        "decay": "exponential",
        "zero_first_stage": True,
        "enabled": True,
    }
    b = SigmaScheduler(0.5, 0.1, 3, 7, decay="linear", zero_first_stage=False)
    b.load_state_dict(state)
    assert b == a and b.schedule() == a.schedule()
    for clone in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), copy.copy(a)):
        assert clone == a and clone.schedule() == a.schedule()
    with pytest.raises(ValueError, match="unsupported version 2"):
        b.load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match="unknown key"):
        b.load_state_dict({**state, "step": 3})
    assert b == a  # a failed load leaves it unchanged


def test_from_config_plan_block():
    block = {"enabled": True, "sigma_start": 0.05, "sigma_end": 0.0005, "num_stages": 10, "layer_types": ["rmsnorm"]}
    sched = SigmaScheduler.from_config(block, 174)
    assert sched == SigmaScheduler(0.05, 0.0005, 10, 174)
    # PyYAML reads `5e-4` as a string; numeric strings are accepted
    assert SigmaScheduler.from_config({**block, "sigma_end": "5e-4"}, 174) == sched
    # a mapping that is not a dict (omegaconf's DictConfig behaves like this)
    class Cfg:
        def __init__(self, d):
            self._d = d

        def keys(self):
            return self._d.keys()

        def __getitem__(self, k):
            return self._d[k]

    assert SigmaScheduler.from_config(Cfg(block), 174) == sched
    off = SigmaScheduler.from_config({"enabled": False}, 174)
    assert off.enabled is False and set(off.schedule()) == {0.0}
    cos = SigmaScheduler.from_config({**block, "decay": "cosine", "zero_first_stage": False, "apply_to": "rollout"}, 50)
    assert cos.decay == "cosine" and cos.zero_first_stage is False and cos.sigma(0) == 0.05
    with pytest.raises(ValueError, match='unknown key "sigma_strat"'):
        SigmaScheduler.from_config({**block, "sigma_strat": 0.1}, 174)
    with pytest.raises(ValueError, match='missing key "num_stages"'):
        SigmaScheduler.from_config({"enabled": True, "sigma_start": 0.05, "sigma_end": 0.0005}, 174)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((0.05, 5e-4, 0, 174), {}, "num_stages must be >= 1, got 0"),
        ((0.05, 5e-4, -3, 174), {}, "num_stages must be >= 1, got -3"),
        ((-0.05, 0.0, 10, 174), {"decay": "linear"}, "sigma_start must be >= 0"),
        ((0.05, -1e-3, 10, 174), {"decay": "linear"}, "sigma_end must be >= 0"),
        ((0.001, 0.05, 10, 174), {}, "exponential decay needs sigma_end <= sigma_start"),
        ((0.05, 0.0, 10, 174), {}, "exponential decay cannot reach sigma_end=0"),
        ((0.05, 5e-4, 10, 0), {}, "total_steps must be in 1..=2\\^53, got 0"),
        ((float("nan"), 5e-4, 10, 174), {}, "sigma_start must be a finite number"),
        ((0.05, float("inf"), 10, 174), {}, "sigma_end must be a finite number"),
        ((0.05, 5e-4, 10, 174), {"decay": "step"}, 'unknown decay "step"'),
        (("abc", 5e-4, 10, 174), {}, 'sigma_start: expected a number, got the string "abc"'),
    ],
)
def test_bad_configs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SigmaScheduler(*args, **kwargs)


def test_bad_steps_and_types():
    sched = SigmaScheduler(0.05, 5e-4, 10, 174)
    with pytest.raises(ValueError, match="step must be an integer in"):
        sched.sigma(-1)
    with pytest.raises(TypeError, match="step: expected an integer"):
        sched.sigma(1.5)
    with pytest.raises(TypeError, match="expected a number, got a bool"):
        SigmaScheduler(True, 5e-4, 10, 174)
    assert sched.sigma(np.int64(20)) == sched.sigma(20)


def test_repr_and_properties():
    sched = SigmaScheduler(0.05, 5e-4, 10, 174)
    assert repr(sched) == (
        "SigmaScheduler(sigma_start=0.05, sigma_end=0.0005, num_stages=10, total_steps=174, "
        "decay='exponential', zero_first_stage=True)"
    )
    assert (sched.sigma_start, sched.sigma_end, sched.num_stages, sched.total_steps) == (0.05, 0.0005, 10, 174)
    assert "enabled=False" in repr(SigmaScheduler(0.05, 5e-4, 10, 174, enabled=False))
    assert SigmaScheduler(sigma_start=0.05, sigma_end=5e-4, num_stages=10, total_steps=174) == sched  # kwargs (hydra)
