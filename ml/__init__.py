"""offerflow: next-best offers (cross-sell, upsell, downsell) from a shop's order history.

The package is Airflow-free: the DAGs in ``dags/`` and the ``offerflow`` CLI call the same
functions, which take DataFrames or paths and return DataFrames; I/O stays at the edges.
"""

import os

# Before LightGBM loads libgomp: OpenMP threads that spin while waiting steal the CPU from each other
# and from everything else on a shared machine or an Airflow worker running several tasks (measured
# here, load 5 on 2 cores: the same LightGBM fit 12.8 s spinning, 4.8 s passive). Override by setting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
