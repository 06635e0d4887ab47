"""Build hook for the optional C extensions; the rest of the metadata is in pyproject.toml.

Both are optional: where they cannot be compiled (no C compiler, no Python headers)
setuptools warns and installs the package without them, and the Python code they speed up
runs instead, with the same results.

- `kv_manager._hashing`: chained XXH3-64 block hashes (`kv_manager.hashing`);
- `router_ensemble.routing._owners`: the KV index's hash -> workers table
  (`router_ensemble.routing.index`).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("kv_manager._hashing", sources=["kv_manager/_hashing.c"], optional=True),
        Extension(
            "router_ensemble.routing._owners",
            sources=["router_ensemble/routing/_owners.c"],
            optional=True,
        ),
    ]
)
