"""Seeding that makes a training run a function of its seed, and resumable mid-epoch.

Three kinds of randomness, three rules:

* **Sample order**: :class:`bevperc.training.distributed.ResumableDistributedSampler` shuffles with
  a generator seeded by ``(seed, epoch)`` only, so a resumed run can skip the batches it
  has already seen.
* **Data augmentation**: a dataset must draw its augmentation randomness from
  ``sample_rng(seed, epoch, index)``, a fresh generator per sample. Worker-process global
  RNGs are seeded deterministically too (from ``(seed, epoch, rank)`` and the worker id),
  but which worker loads which batch changes when a run resumes mid-epoch, so only
  per-sample generators give bit-identical augmentation after a resume. The trainer calls
  ``dataset.set_epoch(epoch)`` (when the dataset has it) before each epoch's loader starts::

      class MyDataset(Dataset):
          def set_epoch(self, epoch: int) -> None:
              self.epoch = epoch
          def __getitem__(self, index):
              rng = sample_rng(self.seed, self.epoch, index)
              flip = rng.random() < 0.5
              ...

* **Model randomness** (dropout, stochastic depth): the process-global torch RNG, seeded
  from ``(seed, rank)`` when training starts and saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from bevperc.utils.threads import init_data_worker

# Domain tags keep the streams derived from one seed independent of each other.
_PROCESS_STREAM = 1
_LOADER_STREAM = 2


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer ``keys`` (numpy SeedSequence hashing)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"derive_seed: keys must be non-negative integers, got {keys}")
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-sample augmentation generator, a pure function of ``(seed, epoch, index)``.

    ``index`` is the dataset index (global, not per rank), so the same sample gets the
    same augmentation whatever the number of processes or workers.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def sample_torch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Like :func:`sample_rng` but a CPU ``torch.Generator`` (for torch-side augmentation)."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index))


def seed_process(seed: int, rank: int = 0) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA) from ``(seed, rank)``.

    Different ranks get different streams (so dropout masks differ between GPUs, as in
    ordinary data-parallel training). Call it with rank 0 before building a model to
    make weight initialisation reproducible; DDP copies rank 0's weights to all ranks.
    """
    derived = derive_seed(_PROCESS_STREAM, seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Generator for a DataLoader: its first draw is the worker base seed for this epoch."""
    return torch.Generator().manual_seed(derive_seed(_LOADER_STREAM, seed, epoch, rank))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python/numpy globals from the worker's torch seed, and run
    numpy's BLAS on one thread (:func:`bevperc.utils.threads.init_data_worker`).

    torch seeds each worker with ``base_seed + worker_id`` where ``base_seed`` comes from
    :func:`loader_generator`, so worker RNGs are a function of (seed, epoch, rank, worker).
    """
    init_data_worker(worker_id)
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block (e.g. validation) without disturbing python/numpy/torch/CUDA RNG streams."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
