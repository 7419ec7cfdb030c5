"""An algorithm: pymoo's GA with a stronger mutation, named in a config as `module:Class`."""

from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.operators.mutation.pm import PM


class WideMutationGA(GA):
    """GA whose polynomial mutation spreads wider (eta 5 rather than pymoo's 20)."""

    def __init__(self, pop_size: int = 16, eta: float = 5.0, **kwargs):
        super().__init__(pop_size=pop_size, mutation=PM(eta=eta), **kwargs)
