"""How a DataLoader worker shares the CPU: numpy's BLAS threads and the worker's priority.

numpy hands matrix products and LAPACK calls (``np.linalg.inv``, ``@`` on arrays) to a BLAS library
(OpenBLAS in the numpy wheels) that keeps its own pool of one thread per core. In a process that
shares the cores with busy PyTorch threads, as a DataLoader worker beside the training step does,
those threads wait for each other: inverting one 3x3 matrix then takes milliseconds instead of
microseconds (bench/results/blas_threads.json). The per-sample geometry of the data pipeline is made
of such tiny calls, so data workers run numpy's BLAS on one thread. Where the workers share the cores
with the training step (CPU training), a niceness lets the step's threads run first and the workers
use the time those threads leave idle (``TrainConfig.worker_nice``).
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits


def init_data_worker(worker_id: int, nice: int = 0) -> None:
    """``worker_init_fn`` of a DataLoader: numpy's BLAS/LAPACK (OpenBLAS, MKL, BLIS) on one thread for the
    rest of the worker process, and ``nice`` added to its niceness (lower priority) when positive."""
    threadpool_limits(limits=1, user_api="blas")
    if nice > 0:
        os.nice(nice)
