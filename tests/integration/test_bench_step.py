"""benchmarks/bench_step.py end to end on CPU (tiny float32 model), and verl's QATLinear peer
wired as verl's FSDP engine wires it (its Triton kernel swapped for a torch fake quant, so it
runs on CPU)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("aqn_rs")

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--inter", "128", "--heads", "4",
        "--vocab", "256", "--batch", "4", "--seq", "16", "--steps", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_has_every_variant_for_every_micro(bench, tmp_path):
    out = tmp_path / "step.json"
    res = bench.main(TINY + ["--rounds", "2", "--micro", "1", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["card"] == "CPU" and res["args"]["micro"] == [1, 4]
    measured = [v for v in bench.ORDER if v not in res["skipped"]]
    # verl's peer runs (CUDA) or says why not; the aqn-rs variants and both baselines always run.
    assert set(measured) >= set(bench.ORDER) - {bench.VERL_NAME}
    assert set(res["skipped"]) <= {bench.VERL_NAME} and all(res["skipped"].values())
    for r in (1, 2):
        for m in (1, 4):
            rows = {x["variant"]: x for x in res["rows"] if x["round"] == r and x["micro"] == m}
            assert sorted(rows) == sorted(measured)
            base = (rows["none-before"]["ms"] + rows["none-after"]["ms"]) / 2
            for x in rows.values():
                assert len(x["times_ms"]) == 2 and 0 < x["min_ms"] <= x["ms"] < 60_000
                assert x["ratio"] == pytest.approx(x["ms"] / base)
                # the host's share of each step: taken before the step's end, so never more
                assert len(x["host_ms"]) == 2
                assert all(0 < h <= t for h, t in zip(x["host_ms"], x["times_ms"]))
    for m in ("1", "4"):
        assert sorted(res["summary"][m]) == sorted(measured)


def test_micro_size_fixes_the_micro_batch_not_the_batch(bench, monkeypatch):
    """--micro-size N: every step's micro-batches hold N sequences (the batch grows with the
    count), where --batch splits one batch; --batch need not divide then."""
    seen = []
    real = bench.time_steps

    def spy(model, opt, batch, steps, micro, *a, **k):
        seen.append((micro, batch.shape[0], steps))
        return real(model, opt, batch, steps, micro, *a, **k)

    monkeypatch.setattr(bench, "time_steps", spy)
    res = bench.main(TINY + ["--rounds", "1", "--micro", "1", "3", "--micro-size", "2"])
    timed = {(m, n) for m, n, steps in seen if steps == 2}
    assert timed == {(1, 2), (3, 6)}
    assert res["args"]["micro_size"] == 2 and sorted(res["summary"]) == ["1", "3"]
    seen.clear()
    bench.main(TINY + ["--rounds", "1", "--micro", "1", "2"])
    assert {(m, n) for m, n, steps in seen if steps == 2} == {(1, 4), (2, 4)}
    for bad in (["--micro-size", "0"], ["--micro", "0"], ["--micro", "3"]):
        with pytest.raises(SystemExit):
            bench.main(TINY + bad)


def test_verl_peer_is_applied_and_invalidated_as_verl_does(bench, monkeypatch):
    try:
        bench.load_verl()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"verl unavailable: {e}")
    import sys

    linear = sys.modules["verl.utils.qat.linear"]
    calls = []

    def torch_fq(w, global_amax=None, block_size=16, **_):  # stands in for the Triton kernel
        calls.append(float(global_amax))
        return w.round(decimals=1)

    monkeypatch.setattr(linear, "fp4_fake_quant_weight", torch_fq)
    args = bench.argparse.Namespace(device="cpu", dtype="float32", layers=2, hidden=64, inter=128,
                                    heads=4, vocab=256, seq=16)
    model = bench.build(args)
    before = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    after_step, undo = bench.attach(model, bench.VERL_NAME)
    qat = {n: m for n, m in model.named_modules() if isinstance(m, linear.QATLinear)}
    assert sorted(qat) == sorted(n for n in before if n != "lm_head") and len(qat) == 14
    assert all(q.mode == linear.QATMode.W4A16 and q.weight is before[n].weight for n, q in qat.items())
    q, k = qat["model.layers.0.self_attn.q_proj"], qat["model.layers.0.self_attn.k_proj"]
    assert [r() for r in q._fusion_siblings_ref] == [k, qat["model.layers.0.self_attn.v_proj"]]
    w0 = q.weight.detach().clone()
    batch = torch.randint(0, 256, (4, 16))
    bench.time_steps(model, opt, batch, 1, 4, "cpu", after_step)
    assert len(calls) == 3 * 4 * 14  # every QATLinear, every micro-batch forward, 3 steps
    assert all(m._cached_weight_amax is None for m in qat.values())  # invalidated after the step
    assert not torch.equal(q.weight, w0)  # the optimizer stepped the shared Parameter
    undo()
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == before
    assert not hasattr(model, "_qat_fuse_enabled")


def test_many_batch_columns_set_and_restore_the_launch_size(bench, monkeypatch):
    """--many-batch-mb N adds a w4a16-nvfp4 column per N, before verl's, with the multi-tensor
    launch size set while it runs and the previous value back after; without the CUDA kernels
    the column says why it is skipped."""
    rs = bench.aqn_rs._aqn_rs
    try:
        before = rs.cuda_set_tuning()
    except RuntimeError:
        res = bench.main(TINY + ["--rounds", "1", "--micro", "1", "--many-batch-mb", "8"])
        assert "without CUDA kernels" in res["skipped"]["w4a16-nvfp4-batch8MiB"]
        return
    seen = []
    real = bench.time_steps

    def spy(*a, **k):
        seen.append(rs.cuda_set_tuning()[3:5])
        return real(*a, **k)

    monkeypatch.setattr(bench, "time_steps", spy)
    res = bench.main(TINY + ["--rounds", "1", "--micro", "1", "--many-batch-mb", "8", "0.5", "--l2-keep-mb", "2"])
    names = ["w4a16-nvfp4-batch8MiB", "w4a16-nvfp4-batch8MiB-keep2MiB",
             "w4a16-nvfp4-batch0.5MiB", "w4a16-nvfp4-batch0.5MiB-keep2MiB"]
    assert res["order"][-6:] == names + [bench.VERL_NAME, "none-after"]
    assert all(n in res["summary"]["1"] for n in names)
    assert {(8 << 20, 0), (8 << 20, 2 << 20), (1 << 19, 0), (1 << 19, 2 << 20)} <= set(seen)
    assert rs.cuda_set_tuning() == before
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--many-batch-mb", "0"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--l2-keep-mb", "4"])  # needs --many-batch-mb
