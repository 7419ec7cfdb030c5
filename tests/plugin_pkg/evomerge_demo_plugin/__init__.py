"""A tiny evomerge plugin: ``plugin_average`` (merge method), ``plugin_mean`` (estimator),
``plugin_constant`` (fitness backend, with its options model) and ``plugin_random`` (search algorithm),
registered through entry points (see its pyproject.toml)."""
