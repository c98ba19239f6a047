"""What the server serves, kept apart from how it is asked (HTTP lives in `server/`).

live.py         LiveSet: the served expert set while the server runs (seed + registry,
                hot-add, remove, rebuild, background static builds, the engine's mixture)
served_set.py   ServedSet (everything that answers at one moment) and SetBuilder
publisher.py    Publisher: the current set, swapped whole; subscribers hear of each one
watcher.py      RegistryWatcher: brings in what other replicas change in a shared registry
catalog.py      ModelCatalog: the model ids one `ServedSet` serves, and what each is
binding.py      Binder: what a request runs with (adapter, leases, the `merge` it reports)
experiments.py  A/B experiments: arms, sticky assignment, the feedback book

Layering: server -> service -> runtime -> router -> adapters (tests/unit/test_layers.py).
"""
