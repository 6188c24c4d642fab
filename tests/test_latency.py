"""The step-latency model: interpolation, robustness to stalled forwards, drift."""

import json

import pytest
import torch

from adaspec.engine import LatencyModel


def test_interpolates_between_buckets_and_never_decreases():
    lat = LatencyModel()
    for n, s in ((1, 0.010), (8, 0.030), (32, 0.025), (64, 0.080)):  # 32: a noisy dip
        lat.observe(n, s)
    assert float(lat.predict(1)) == pytest.approx(0.010)
    assert float(lat.predict(4.5)) == pytest.approx(0.020)
    pred = lat.predict(torch.arange(1, 100))
    assert (pred[1:] >= pred[:-1]).all()
    assert float(lat.predict(96)) == pytest.approx(0.080 + 32 * (0.080 - 0.030) / 32)


def test_one_stalled_forward_moves_nothing():
    lat = LatencyModel()
    for s in (0.025, 0.026, 0.024):
        lat.observe(1, s)
    lat.observe(4, 0.030)
    before = lat.predict(torch.tensor([1.0, 4.0]))
    lat.observe(1, 0.075)  # a 3x stall
    assert torch.equal(lat.predict(torch.tensor([1.0, 4.0])), before)


def test_a_lasting_change_moves_the_buckets_not_in_use():
    lat = LatencyModel(window=3)
    lat.observe(16, 0.040)
    for _ in range(12):
        lat.observe(1, 0.020)
    for _ in range(3):  # the machine got 1.5x slower: only size 1 is measured
        lat.observe(1, 0.030)
    assert float(lat.predict(1)) == pytest.approx(0.030)
    assert float(lat.predict(16)) == pytest.approx(0.060)


def test_a_drift_seen_by_two_buckets_in_use_moves_a_stale_one_once():
    lat = LatencyModel(window=1)
    lat.observe(64, 0.100)
    for _ in range(4):
        lat.observe(1, 0.020)
        lat.observe(8, 0.030)
    lat.observe(1, 0.030)  # both sizes in use get 1.5x slower
    lat.observe(8, 0.045)
    assert float(lat.predict(64)) == pytest.approx(0.150)


def test_a_bucket_back_from_staleness_moves_no_other():
    lat = LatencyModel(window=1)
    lat.observe(32, 0.080)  # the warm-up's single-prompt forward
    for _ in range(5):
        lat.observe(1, 0.020)
    lat.observe(32, 0.300)  # 32 tokens at batch 16: a different context, not a drift
    assert float(lat.predict(1)) == pytest.approx(0.020)
    assert float(lat.predict(32)) == pytest.approx(0.300)


def test_buckets_in_use_keep_their_own_measurements():
    lat = LatencyModel(window=3)
    for _ in range(3):  # plain steps of 16 requests: measured directly
        lat.observe(16, 0.120)
    for s in (0.080, 0.300, 0.300):  # the warm-up's 32 tokens, then 32 at batch 16
        lat.observe(32, s)
        lat.observe(16, 0.120)
    assert float(lat.predict(32)) == pytest.approx(0.300)
    assert float(lat.predict(16)) == pytest.approx(0.120)


def test_state_dict_and_bad_input():
    lat = LatencyModel(grid=(1, 4), window=2)
    lat.observe(3, 0.5)
    assert lat.state_dict() == {
        "grid": [1, 4],
        "window": 2,
        "samples": {1: [(3.0, 0.5)]},
        "best": {1: 0.5},
    }
    with pytest.raises(ValueError, match="no observations"):
        LatencyModel().predict(1)
    with pytest.raises(ValueError, match="window"):
        LatencyModel(window=0)
    with pytest.raises(ValueError, match="grid"):
        LatencyModel(grid=[0, 2])
    with pytest.raises(ValueError, match="tokens >= 1"):
        lat.observe(0, 0.1)
    with pytest.raises(ValueError, match="finite seconds"):
        lat.observe(1, float("inf"))


def test_best_prices_each_bucket_at_the_lowest_it_stood_for():
    """A stall measured by every recent sample of a bucket sets its prediction; the best
    price remembers what the bucket cost before (what a probe is priced at)."""
    lat = LatencyModel(window=3)
    for _ in range(3):
        lat.observe(1, 0.020)
        lat.observe(16, 0.100)
    for _ in range(3):  # a burst of busy neighbours while size 16 ran
        lat.observe(16, 0.500)
    assert float(lat.predict(16)) == pytest.approx(0.500)
    assert float(lat.predict(16, best=True)) == pytest.approx(0.100)
    assert float(lat.predict(8, best=True)) == pytest.approx(0.020 + 7 / 15 * 0.080)
    for _ in range(3):  # measured again: both follow
        lat.observe(16, 0.090)
    assert float(lat.predict(16)) == pytest.approx(0.090)
    assert float(lat.predict(16, best=True)) == pytest.approx(0.090)
    back = LatencyModel.from_state_dict(lat.state_dict())
    assert float(back.predict(16, best=True)) == pytest.approx(0.090)


def test_from_state_dict_round_trips_through_json():
    lat = LatencyModel(window=3)
    for tokens, seconds in [(1, 0.02), (1, 0.021), (16, 0.05), (64, 0.09), (64, 0.3)]:
        lat.observe(tokens, seconds)
    back = LatencyModel.from_state_dict(json.loads(json.dumps(lat.state_dict())))
    points = torch.tensor([1.0, 3.0, 16.0, 40.0, 64.0, 200.0])
    assert torch.equal(back.predict(points), lat.predict(points))
    assert back.state_dict() == lat.state_dict()
    for _ in range(3):  # restored buckets are in use: a change of one moves no other
        back.observe(16, 0.2)
    assert float(back.predict(16)) == pytest.approx(0.2)
    assert float(back.predict(1)) == pytest.approx(float(lat.predict(1)))
    older = {k: v for k, v in lat.state_dict().items() if k != "best"}  # states before "best"
    assert torch.equal(LatencyModel.from_state_dict(older).predict(points), lat.predict(points))


def test_from_state_dict_rejects_bad_state():
    good = LatencyModel(grid=(1, 4), window=2)
    good.observe(3, 0.5)
    state = good.state_dict()
    with pytest.raises(ValueError, match="missing the key 'samples'"):
        LatencyModel.from_state_dict({k: v for k, v in state.items() if k != "samples"})
    with pytest.raises(TypeError, match="mapping"):
        LatencyModel.from_state_dict([("grid", [1])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket 5"):
        LatencyModel.from_state_dict({**state, "samples": {5: [(3.0, 0.5)]}})
    with pytest.raises(ValueError, match="finite seconds"):
        LatencyModel.from_state_dict({**state, "samples": {1: [(3.0, -1.0)]}})
    with pytest.raises(ValueError, match="window"):
        LatencyModel.from_state_dict({**state, "window": 0})
    with pytest.raises(ValueError, match="best"):
        LatencyModel.from_state_dict({**state, "best": {1: float("nan")}})
    with pytest.raises(TypeError, match="best"):
        LatencyModel.from_state_dict({**state, "best": [0.1]})


@pytest.mark.parametrize("seed", range(5))
def test_one_count_is_predicted_as_in_a_tensor(seed):
    # (a number takes a plain-float path: bit for bit the tensor path's arithmetic)
    g = torch.Generator().manual_seed(seed)
    for buckets in (1, 2, 6):
        lat = LatencyModel()
        for n in torch.randint(1, 600, (buckets * 3,), generator=g).tolist():
            lat.observe(n, float(torch.rand((), generator=g)) * 0.3)
        counts = [0.0, 0.5, 1.0, 3.0, 7.5, 31.0, 64.0, 333.0, 1e4]
        for best in (False, True):
            batch = lat.predict(torch.tensor(counts, dtype=torch.float64), best=best)
            for c, b in zip(counts, batch.tolist(), strict=True):
                one = lat.predict(c, best=best)
                assert one.dtype == torch.float64
                assert one.shape == ()
                assert float(one) == b
