"""offerflow: next-best offers (cross-sell, upsell, downsell) from a shop's order history.

The package is Airflow-free: the DAGs in ``dags/`` and the ``offerflow`` CLI call the same
functions, which take DataFrames or paths and return DataFrames; I/O stays at the edges.
"""

__version__ = "0.1.0"
