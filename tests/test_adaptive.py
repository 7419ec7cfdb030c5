"""Adaptive item selection (Fluid Benchmarking's rule): the most informative items at the current
ability, a batch at a time, until the accuracy estimate is precise enough; racing; and the held-out
check that keeps an estimate from being worse than the plain mean of the same items."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge import irt
from evomerge.errors import EvomergeError


@pytest.fixture(scope="module")
def population():
    """400 simulated subjects of a known 2PL over 200 items: parameters without fitting noise."""
    return irt.simulate_2pl(400, 200, seed=3)


def _asker(row, log):
    def answer(items):
        log.append(list(items))
        return row[items]

    return answer


def test_items_come_in_batches_of_the_most_informative_and_stop_when_precise(population):
    responses, params = population
    log: list[list[int]] = []
    res = irt.adaptive_test(
        params, _asker(responses[0], log), target_se=0.05, max_items=120, batch=4, explore=0.5
    )
    assert res.stopped == "precise" and res.se <= 0.05
    assert all(len(b) == 4 for b in log) and len(res.idx) == 4 * len(log)
    assert len(set(res.idx.tolist())) == len(res.idx)  # no item asked twice
    # the first batch: 2 random items, then the 2 most informative at the population's mean ability
    assert log[0][2:] == irt.most_informative(params, np.zeros(1), log[0][:2], 2)
    np.testing.assert_array_equal(res.y, responses[0, res.idx])
    pure: list[list[int]] = []
    irt.adaptive_test(params, _asker(responses[0], pure), target_se=0.05, max_items=8, explore=0.0)
    assert pure[0] == irt.most_informative(params, np.zeros(1), [], 4)  # explore=0: the information rule


def test_adaptive_items_beat_random_items_at_the_same_count(population):
    responses, params = population
    truth = responses.mean(axis=1)
    rng = np.random.default_rng(0)
    adaptive, random, counts = [], [], []
    for s in range(60):
        res = irt.adaptive_test(
            params, lambda items, r=responses[s]: r[items], target_se=0.05, max_items=200, explore=0.0
        )
        counts.append(len(res.idx))
        adaptive.append(abs(res.estimate - truth[s]))
        idx = np.sort(rng.choice(200, len(res.idx), replace=False))
        random.append(abs(irt.estimate_pirt(params, idx, responses[s, idx]) - truth[s]))
    assert np.mean(counts) < 40
    assert np.mean(adaptive) < 0.9 * np.mean(random)


def test_limits_and_racing(population):
    responses, params = population
    res = irt.adaptive_test(params, lambda items: responses[1][items], target_se=1e-4, max_items=10, batch=4)
    assert res.stopped == "max_items" and len(res.idx) == 10  # the last batch is cut to the limit
    raced = irt.adaptive_test(
        params,
        lambda items: responses[1][items],
        target_se=1e-4,
        max_items=200,
        race=lambda e, se: e + 3 * se < 0.99,
    )
    assert raced.stopped == "raced" and len(raced.idx) == 4
    all_items = irt.adaptive_test(
        params, lambda items: responses[1][items], target_se=1e-9, max_items=200, batch=50
    )
    assert all_items.stopped == "exhausted" and all_items.estimate == pytest.approx(responses[1].mean())


def test_a_sharp_prior_stops_the_test_early_and_the_items_estimate_is_kept(population):
    """sgpirt's case: the caller fuses the items' estimate with the surrogate's prediction, and the
    precision rule judges the fused one (Gaussian fusion with a prior of SE 0.03 reaches SE <= 0.05 at
    once), while the result keeps what the items alone say."""
    responses, params = population

    def fuse(estimate, se, mu=0.6, s2=0.03**2):
        v = se**2
        return (s2 * estimate + v * mu) / (s2 + v), float(np.sqrt(s2 * v / (s2 + v)))

    alone = irt.adaptive_test(params, lambda items: responses[2][items], target_se=0.05, max_items=200)
    fused = irt.adaptive_test(
        params, lambda items: responses[2][items], target_se=0.05, max_items=200, posterior=fuse
    )
    assert fused.stopped == "precise" and len(fused.idx) == 4 < len(alone.idx)
    assert fused.se > 0.05  # the items' own standard error, not the fused one
    seen = []
    irt.adaptive_test(
        params,
        lambda items: responses[2][items],
        target_se=1e-6,
        max_items=8,
        posterior=fuse,
        race=lambda e, se: seen.append((e, se)) or False,
    )
    assert all(se < 0.03 for _, se in seen)  # the race rule is given the fused estimate too


def test_the_held_out_check_mixes_towards_the_mean_where_irt_is_worse(population):
    responses, params = population
    good = irt.check_adaptive(params, responses[:40], target_se=0.06, max_items=60, explore=0.0)
    assert good.mae_mix <= min(good.mae_irt, good.mae_mean) + 1e-12 and good.subjects == 40
    assert good.mae_irt < good.mae_mean  # true parameters: IRT beats the mean of the same items
    # parameters whose items barely depend on ability (another test's, say): the IRT estimate is mostly
    # their fixed prediction, the check measures that and leans on the mean of the items answered
    wrong = irt.IrtParams("2pl", np.full(params.n_items, 0.01), params.b)
    bad = irt.check_adaptive(wrong, responses[:40], target_se=0.06, max_items=60, explore=0.0)
    assert bad.mae_irt > 2 * good.mae_irt and bad.lam > 0
    assert bad.mae_mix <= min(bad.mae_irt, bad.mae_mean) + 1e-12


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"target_se": 0.0, "max_items": 10}, "target_se must be positive; got 0.0"),
        (
            {"target_se": 0.05, "max_items": 201},
            r"max_items must be in \[1, 200\] \(the items there are\); got 201",
        ),
    ],
)
def test_bad_limits_are_one_line(population, kw, message):
    _, params = population
    with pytest.raises(EvomergeError, match=message):
        irt.adaptive_test(params, lambda items: [0.0] * len(items), **kw)


def _spec(params, name, cols, **kw):
    from evomerge.adaptive import AdaptiveSpec

    return AdaptiveSpec(name, tuple(cols), params, kw.pop("target_se", 0.05), kw.pop("max_items", 60), **kw)


def test_a_workers_adaptive_tests_share_answers_and_race(population):
    """Two objectives over the same items ask each item once; a race against a front the candidate
    cannot reach stops the last objective's test after its first batch."""
    from evomerge.adaptive import Race, adaptive_evaluate

    responses, params = population
    cols = [("t", str(i)) for i in range(params.n_items)]
    asked: list[dict[str, list[int]]] = []

    def ask(items):
        asked.append(items)
        return {t: {str(i): float(responses[5, i]) for i in ids} for t, ids in items.items()}

    specs = (_spec(params, "a", cols), _spec(params, "b", cols))
    scores, answered = adaptive_evaluate(specs, ask)
    flat = [i for batch in asked for i in batch["t"]]
    assert len(flat) == len(set(flat)) == len(answered["t"])  # no item asked twice
    assert scores["a"].estimate == pytest.approx(scores["b"].estimate, abs=0.05)
    assert {s.stopped for s in scores.values()} <= {"precise", "max_items"}

    unreachable = Race(("max", "max"), ((0.99, 0.99),), z=1.64)
    asked.clear()
    raced, _ = adaptive_evaluate(specs, ask, unreachable)
    assert raced["b"].stopped == "raced" and raced["b"].items == 4
    assert raced["a"].stopped != "raced"  # only the last objective's test races: then all are known
    reachable = Race(("max", "max"), ((0.0, 0.0),), z=1.64)
    assert adaptive_evaluate(specs, ask, reachable)[0]["b"].stopped != "raced"


def test_a_prior_is_fused_with_the_adaptive_estimate(population):
    from evomerge.adaptive import adaptive_evaluate

    responses, params = population
    cols = [("t", str(i)) for i in range(params.n_items)]

    def ask(items):
        return {t: {str(i): float(responses[7, i]) for i in ids} for t, ids in items.items()}

    plain = adaptive_evaluate((_spec(params, "a", cols),), ask)[0]["a"]
    sure = adaptive_evaluate((_spec(params, "a", cols, prior=(0.9, 1e-8)),), ask)[0]["a"]
    vague = adaptive_evaluate((_spec(params, "a", cols, prior=(0.9, 1e6)),), ask)[0]["a"]
    assert sure.estimate == pytest.approx(0.9, abs=1e-4) and sure.se < plain.se
    assert vague.estimate == pytest.approx(plain.estimate, abs=1e-6)


@pytest.mark.parametrize(
    ("objectives", "message"),
    [
        (
            [{"name": "m", "estimator": "gpirt", "items": "adaptive"}],
            "objective 'm': items: adaptive needs an estimator with a standard error (irt, pirt, sgpirt); "
            "gpirt has none",
        ),
        (
            [{"name": "m", "estimator": "pirt", "items": "adaptive", "target_se": 0}],
            "target_se: Input should be greater than 0",
        ),
        (
            [{"name": "m", "estimator": "pirt", "items": 12, "race": True}],
            "objective 'm': race applies only with items: adaptive",
        ),
        (
            [{"name": "m", "estimator": "pirt", "items": 12, "max_items": 30}],
            "max_items applies only with items: adaptive",
        ),
        (
            [{"name": "m", "items": "adaptive"}],
            "objective 'm': items: adaptive needs an estimator (pirt, irt or sgpirt)",
        ),
        (
            [
                {"name": "m", "estimator": "pirt", "items": "adaptive"},
                {"name": "s", "of": "zoo_script", "estimator": "pirt", "items": 6},
            ],
            "objective 'm' has items: adaptive, objective 's' does not",
        ),
    ],
)
def test_bad_adaptive_configs_are_one_line(objectives, message):
    from evomerge.config import parse_config

    data = {
        "models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}},
        "fitness": {"tasks": ["zoo_addition", "zoo_script"], "calibration": {"random_merges": 8}},
        "objectives": objectives,
        "algorithm": {"name": "nsga2"} if len(objectives) > 1 else {"name": "ga"},
    }
    with pytest.raises(EvomergeError) as e:
        parse_config(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_biased_model_is_corrected_by_the_random_items_and_its_se_covers_the_truth(population):
    """Parameters that are wrong (every item 0.5 too hard) and say so through irt_bias: the estimate, shrunk
    toward the random items' residual correction, stays as good, and the standard error includes the bias."""
    responses, params = population
    wrong = irt.IrtParams("2pl", params.a, params.b + 0.5, irt_bias=0.08)
    blind = irt.IrtParams("2pl", params.a, params.b + 0.5)  # the same, not knowing its bias
    truth = responses.mean(axis=1)
    errs, blind_errs, covered = [], [], []
    for s in range(30):
        ask = lambda items, r=responses[s]: r[items]  # noqa: E731
        res = irt.adaptive_test(wrong, ask, target_se=1e-6, max_items=60, seed=s)
        errs.append(abs(res.estimate - truth[s]))
        covered.append(errs[-1] <= 1.96 * res.se)
        blind_errs.append(
            abs(irt.adaptive_test(blind, ask, target_se=1e-6, max_items=60, seed=s).estimate - truth[s])
        )
    assert np.mean(errs) <= 1.15 * np.mean(blind_errs)
    assert np.mean(covered) >= 0.85


def test_3pl_adaptive_test_runs_on_information_with_guessing():
    responses, params = irt.simulate_2pl(50, 150, seed=4, guessing=0.2)
    res = irt.adaptive_test(
        params, lambda items: responses[0][items], target_se=0.05, max_items=60, explore=0.0
    )
    assert res.stopped in ("precise", "max_items") and 0 <= res.estimate <= 1 and res.se > 0
    assert res.idx[:4].tolist() == irt.most_informative(params, np.zeros(1), [], 4)
