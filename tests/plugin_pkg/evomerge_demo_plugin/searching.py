"""plugin_random: a search algorithm registered from outside evomerge (pymoo's random search)."""

from __future__ import annotations

from pymoo.algorithms.soo.nonconvex.random_search import RandomSearch

from evomerge.algorithms import AlgorithmSpec


class PluginRandomSearch(RandomSearch):
    """pymoo's random search under the plugin's name."""


SPEC = AlgorithmSpec(
    "evomerge_demo_plugin.searching:PluginRandomSearch",
    "any",
    pop_option="n_points_per_iteration",
    seeded=False,
)
