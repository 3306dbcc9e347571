"""Thread pools of the libraries numpy calls into, next to PyTorch's own.

numpy hands matrix products and LAPACK calls (``np.linalg.inv``, ``@`` on arrays) to a BLAS library
(OpenBLAS in the numpy wheels) that keeps its own pool of one thread per core. In a process that
shares the cores with busy PyTorch threads, as a DataLoader worker beside the training step does,
those threads wait for each other: inverting one 3x3 matrix then takes milliseconds instead of
microseconds (bench/results/blas_threads.json). The per-sample geometry of the data pipeline is made
of such tiny calls, so data workers run numpy's BLAS on one thread.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def init_data_worker(worker_id: int) -> None:
    """``worker_init_fn`` of a DataLoader: numpy's BLAS/LAPACK (OpenBLAS, MKL, BLIS) on one thread for the
    rest of the worker process."""
    threadpool_limits(limits=1, user_api="blas")
