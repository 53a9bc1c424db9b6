"""Bad configurations raise ConfigError naming the field and the fix; mismatched states are refused."""

import numpy as np
import pytest

from dfsmerge.errors import CheckpointError, ConfigError
from dfsmerge.optim import make_optimizer

OK = dict(dim=3, bounds=(0.0, 1.0), seed=0, popsize=4)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("adam", {}, r"optimizer='adam' is unknown; use one of cma, llm, nsga2, random"),
        ("cma", {"dim": 0}, r"dim=0 must be an integer >= 1"),
        ("cma", {"bounds": (1.0, 0.0)}, r"gene 0 are lo=1.0 >= hi=0.0"),
        ("cma", {"bounds": (0.0, np.inf)}, r"bounds must be finite"),
        ("cma", {"bounds": (np.zeros(2), 1.0)}, r"shape \(3,\)"),
        ("cma", {"x0": [0.5, 2.0, 0.5]}, r"x0\[1\]=2.0 lies outside the bounds \[0.0, 1.0\]"),
        ("cma", {"x0": [0.5]}, r"x0 has shape \(1,\)"),
        ("random", {"seed": -1}, r"seed=-1 must be an integer >= 0"),
        ("nsga2", {"popsize": 1}, r"popsize=1 must be an integer >= 2"),
        ("nsga2", {"n_obj": 0}, r"n_obj=0"),
        ("cma", {"n_obj": 2}, r"optimizer='cma' is single-objective .* use optimizer: nsga2"),
        ("nsga2", {"binary_mask": [True, False]}, r"binary_mask has shape \(2,\).*boolean array of shape \(3,\)"),
        ("nsga2", {"binary_mask": np.ones(3, bool), "integer_mask": np.ones(3, bool)}, r"gene 0 is in both"),
        ("random", {"bounds": (0.2, 0.8), "integer_mask": np.ones(3, bool)}, r"containing no integer"),
        ("cma", {"sigma": 0.3}, r"option sigma=0.3 is not a setting of 'cma' \(remove it\); 'cma' takes: penalty, "
                                r"sigma0, stds, cma_options"),
        ("cma", {"sigma0": -1.0}, r"option sigma0=-1.0: Input should be greater than 0"),
        ("nsga2", {"crossover_prob": 2.0}, r"option crossover_prob=2.0"),
        ("random", {"penalty": float("nan")}, r"penalty=nan must be finite"),
        ("cma", {"cma_options": {"popsize": 9}}, r"cma_options.popsize is set by dfsmerge"),
        ("cma", {"cma_options": {"tolfunn": 1e-3}}, r"cma_options.tolfunn is not a pycma option"),
    ],
)
def test_bad_config(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_optimizer(name, **{**OK, **kw})


def test_cma_passes_options_through():
    opt = make_optimizer("cma", **OK, sigma0=0.1, cma_options={"tolfun": 1e-3})
    X = opt.ask()
    assert X.shape == (4, 3)


def test_load_state_refuses_other_config():
    a = make_optimizer("cma", **OK)
    X = a.ask()
    a.tell(X, X.sum(1))
    state = a.state_dict()
    with pytest.raises(ConfigError, match=r"different seed"):
        make_optimizer("cma", **{**OK, "seed": 1}).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"different options.sigma0"):
        make_optimizer("cma", **OK, sigma0=0.5).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"saved state is from optimizer='cma'.*optimizer: cma"):
        make_optimizer("random", **OK).load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        make_optimizer("cma", **OK).load_state_dict({"foo": 1})


def test_validate_options_without_building():
    from dfsmerge.optim import validate_options

    assert validate_options("nsga2", crossover_eta=5.0).crossover_eta == 5.0
    with pytest.raises(ConfigError, match=r"optimizer='nsga2': option sigma0=0.3 is not a setting of 'nsga2' \(a "
                                          r"setting of cma: remove it or use that optimizer\)"):
        validate_options("nsga2", sigma0=0.3)
    with pytest.raises(ConfigError, match=r"cma_options.bounds is set by dfsmerge"):
        validate_options("cma", cma_options={"bounds": [0, 1]})


def test_cma_is_separable_above_100_genes_unless_asked():
    import numpy as np

    from dfsmerge.optim import make_optimizer
    from dfsmerge.optim.cmaes import DIAGONAL_ABOVE

    lo, hi = -np.ones(DIAGONAL_ABOVE + 20), np.ones(DIAGONAL_ABOVE + 20)
    big = make_optimizer("cma", dim=lo.size, bounds=(lo, hi), seed=0, popsize=8)
    full = make_optimizer("cma", dim=lo.size, bounds=(lo, hi), seed=0, popsize=8,
                          cma_options={"CMA_diagonal": False})
    small = make_optimizer("cma", dim=10, bounds=(lo[:10], hi[:10]), seed=0, popsize=8)
    assert big._es.opts["CMA_diagonal"] is True
    assert full._es.opts["CMA_diagonal"] is False
    assert small._es.opts["CMA_diagonal"] in (False, 0, "0*100*N/popsize**0.5")
    # separable CMA still optimises: on a shifted sphere it beats random search at the same budget
    f = lambda X: ((X - 0.3) ** 2).sum(axis=1, keepdims=True)  # noqa: E731
    rand = make_optimizer("random", dim=lo.size, bounds=(lo, hi), seed=0, popsize=8)
    for _ in range(30):
        for opt in (big, rand):
            X = opt.ask()
            opt.tell(X, f(X))
    assert big.best.f < 0.8 * rand.best.f


def test_cma_keeps_going_on_flat_fitness():
    """A merge search often scores a whole population 0; that must not end the search."""
    import numpy as np

    from dfsmerge.optim import make_optimizer

    lo, hi = -np.ones(6), np.ones(6)
    opt = make_optimizer("cma", dim=6, bounds=(lo, hi), seed=0, popsize=6)
    for _ in range(5):
        X = opt.ask()
        opt.tell(X, np.zeros((len(X), 1)))
    assert not opt.stop(), opt.stop_reason
