"""DDP through torchrun: 2 CPU processes with gloo against one process with the global batch.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/toy_train.py
--batch-size 4`` trains the toy model (float64, GroupNorm, no dropout so the two set-ups
are comparable) with learned task weights (extra parameters whose gradients the trainer
averages itself) and a NaN loss on rank 1 only at iteration 3. Checks:

* both ranks end with bit-identical weights, task weights and loss-normaliser state;
* both skipped iteration 3 (the non-finite flag is all-reduced, so no rank hangs in backward);
* the result equals one process with ``--batch-size 8`` (same global batch) to ~1e-12:
  averaged gradients over ranks == gradient of the mean over the global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bevperc.training.distributed import ResumableDistributedSampler, iterations_per_epoch
from helpers.toy_train import ToyQuadrants

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = REPO / "tests" / "helpers" / "toy_train.py"
COMMON = ["--float64", "--norm", "group", "--dropout", "0", "--no-tensorboard", "--nan-at-step", "3",
          "--epochs", "2", "--checkpoint-every", "0", "--lr", "1e-2"]
TIMEOUT_S = 300


def _run_all(commands: dict[str, list[str]], logs: Path) -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                    env=env, cwd=REPO) for name, cmd in commands.items()}
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            pytest.fail(f"{name} did not finish in {TIMEOUT_S}s:\n{(logs / f'{name}.log').read_text()}")
    return codes


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TOY_TRAIN), "--work-dir", str(root / "ddp"), "--batch-size", "4", "--nan-ranks", "1",
           "--dump", str(root / "ddp_dump"), *COMMON]
    single = [sys.executable, str(TOY_TRAIN), "--work-dir", str(root / "single"), "--batch-size", "8",
              "--nan-ranks", "0", "--dump", str(root / "single_dump"), *COMMON]
    codes = _run_all({"ddp": ddp, "single": single}, root)
    for name in codes:
        assert codes[name] == 0, (root / f"{name}.log").read_text()
    return {"root": root,
            "rank0": torch.load(root / "ddp_dump" / "rank0.pt", weights_only=True),
            "rank1": torch.load(root / "ddp_dump" / "rank1.pt", weights_only=True),
            "single": torch.load(root / "single_dump" / "rank0.pt", weights_only=True)}


@pytest.mark.slow
def test_both_ranks_end_with_identical_weights(ddp_and_single):
    rank0, rank1 = ddp_and_single["rank0"], ddp_and_single["rank1"]
    for section in ("model", "task_weights"):
        for name, tensor in rank0[section].items():
            assert torch.equal(tensor, rank1[section][name]), f"{section}.{name} differs between ranks"
    assert torch.equal(rank0["normaliser"]["mean"], rank1["normaliser"]["mean"])
    # Logged losses are all-reduced, so both ranks record the same curve (NaN at the skipped step).
    np.testing.assert_array_equal(rank0["history"]["loss"], rank1["history"]["loss"])


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_all_ranks(ddp_and_single):
    for rank in ("rank0", "rank1"):
        assert ddp_and_single[rank]["skipped_steps"] == 1
        assert ddp_and_single[rank]["history"]["skipped_steps"] == [3]
    log = (ddp_and_single["root"] / "ddp.log").read_text()
    assert "non-finite loss (nan, 1 of 2 ranks)" in log


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_global_batch(ddp_and_single):
    ddp, single = ddp_and_single["rank0"], ddp_and_single["single"]
    assert len(ddp["history"]["loss"]) == len(single["history"]["loss"]) == 12
    for name, tensor in single["model"].items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(ddp["task_weights"]["log_vars"], single["task_weights"]["log_vars"],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ddp["normaliser"]["mean"], single["normaliser"]["mean"], rtol=1e-10, atol=1e-12)
    finite = [i for i, loss in enumerate(single["history"]["loss"]) if loss == loss]
    assert finite == [i for i in range(12) if i != 2]
    assert [ddp["history"]["loss"][i] for i in finite] == pytest.approx(
        [single["history"]["loss"][i] for i in finite], rel=1e-10)
    # And the model did learn (a run that never stepped would agree trivially).
    assert single["history"]["loss"][-1] < single["history"]["loss"][0]


def test_rank_shards_form_the_same_global_batches_as_one_process():
    """Global batch k of 2 ranks x 4 = batch k of 1 process x 8 (as sets): same mean loss."""
    dataset = ToyQuadrants(48, augment=False)
    single = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=5)
    ranks = [ResumableDistributedSampler(dataset, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(3)
    single_order, rank_orders = list(single), [list(s) for s in ranks]
    assert iterations_per_epoch(len(single_order), 8, True) == iterations_per_epoch(len(rank_orders[0]), 4, True)
    for k in range(6):
        global_batch = set(rank_orders[0][4 * k:4 * k + 4]) | set(rank_orders[1][4 * k:4 * k + 4])
        assert global_batch == set(single_order[8 * k:8 * k + 8])
