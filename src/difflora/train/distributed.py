"""Several processes, through accelerate: the Accelerator a job asks for, the module it wraps, and what the ranks
agree on.

Launchers are accelerate's and torch's own (`accelerate launch --multi_gpu`, its config file, `torchrun`), one
process per device, on one machine or several. The trained LoRA network goes through `accelerator.prepare` inside
a `TrainingStep` module whose forward is one micro-batch's loss: the LoRA weights enter the frozen model through
hooks, so DDP (bucketed all-reduce overlapping the backward) has to see the forward that uses them. The frozen
model stays outside DDP: it has no gradients to average.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from ..errors import UserError

log = logging.getLogger(__name__)


class TrainingStep(nn.Module):
    """The module accelerate prepares: it owns the trained network, and its forward is a stage's mean loss."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, loss_fn, ctx, batch) -> torch.Tensor:
        return loss_fn(ctx, batch).mean()


_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """`accelerate launch --cpu --num_processes N` (N > 1) starts N ranks through mpirun when accelerate knows an
    MPI hostfile (--mpirun_hostfile, or mpirun_config in the file of --config_file: with --cpu accelerate 1.15 skips
    its default config, commands/launch.py:1218), and ONE process otherwise (its simple launcher, utils/launch.py:110,
    then tells the child only the rendezvous address). Training alone at the per-process batch
    would quietly give another LoRA, so that one process says what starts N ranks instead. Ranks that mpirun
    started get torch's RANK / WORLD_SIZE now (accelerate sets them only when its Accelerator starts): the
    output lock and the logging pick the main process before that."""
    launched_by_accelerate_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if launched_by_accelerate_cpu and "WORLD_SIZE" not in os.environ and any(k in os.environ for k in _MPI_SIZE):
        from accelerate.utils.environment import get_cpu_distributed_information

        ranks = get_cpu_distributed_information()
        os.environ.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank),
                          LOCAL_WORLD_SIZE=str(ranks.local_world_size))
    rank_known = any(k in os.environ for k in ("WORLD_SIZE", "RANK"))
    if launched_by_accelerate_cpu and "MASTER_ADDR" in os.environ and not rank_known:
        raise UserError("`accelerate launch --cpu` with --num_processes above 1 started only this one process "
                        "(accelerate's --cpu launcher starts more through mpirun only, with an MPI hostfile); "
                        "add --mpirun_hostfile FILE (or --config_file with the hostfile `accelerate config` saved: "
                        "with --cpu accelerate reads no default config), or start the ranks with `accelerate "
                        "launch --multi_gpu --num_processes N` (gloo on a machine without GPUs) or `torchrun "
                        "--nproc_per_node N -m difflora train JOB`")


def quiet_other_processes() -> None:
    """Log once: the processes other than the first (RANK > 0, set by the launcher) report errors only."""
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger("difflora").setLevel(logging.ERROR)


def make_accelerator(job):
    """The run's Accelerator: DDP for several processes, DeepSpeed ZeRO when the job asks (fsdp: shard_frozen).

    Each global batch is split over the processes (split_batches: the scheduler steps once per optimizer step,
    as with one process). Loss scaling stays off: a non-finite gradient stops the run (stages.py) instead of
    being skipped, with one process or many.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, GradScalerKwargs

    on_gpu = torch.cuda.is_available()  # (validate.job checked the fsdp / deepspeed keys)
    plugins = {}
    if job.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=job.zero_stage if job.zero_stage is not None else 2,
                                 gradient_accumulation_steps=job.gradient_accumulation_steps,
                                 gradient_clipping=job.max_grad_norm if job.max_grad_norm > 0 else None)
        # no data loader goes through prepare (the batches are difflora's own): DeepSpeed is told the batch
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = job.train_batch_size
        plugins["deepspeed_plugin"] = plugin
    return Accelerator(
        mixed_precision=job.mixed_precision, gradient_accumulation_steps=job.gradient_accumulation_steps,
        cpu=not on_gpu, dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(**_ddp_graph(job)),
                         GradScalerKwargs(enabled=False)],
        **plugins)


def _ddp_graph(job) -> dict:
    """The LoRA weights a forward uses are the same at every step: a static graph (weights a family's forward never
    reaches are found at the first step). Module dropout skips modules at random, and DDP's static graph does not
    take the no_sync of gradient accumulation: there DDP looks for unused weights after each forward instead."""
    static = not job.module_dropout and job.gradient_accumulation_steps == 1
    return {"static_graph": static, "find_unused_parameters": not static}


def shard_frozen(denoiser: nn.Module, processes: int) -> int:
    """FSDP2 (torch's `fully_shard`) of the frozen denoiser over the processes: each block of its outermost
    ModuleLists becomes one unit, gathered for its forward (and its backward) and split again after; the rest of
    the denoiser forms the root unit. The LoRA weights stay whole on every process (DDP averages their
    gradients), so a checkpoint is the main process's own kohya file and resumes with any process count.
    Returns the number of units.

    Not accelerate's FSDP plugin (1.15): it shards everything in the one model prepared with the optimizer
    (accelerator.py:1507-1523), the LoRA too (utils/fsdp_utils.py:885, the root unit), and without DDP the LoRA
    has to be in it to have its gradients averaged; it would exist only in pieces where saves, validation and the
    per-pair sharing read it. On the CPU the plugin is dropped without a word (state.py:986-1016: FSDP only for
    GPU-like process groups; the prepared model is DDP)."""
    from torch.distributed.fsdp import fully_shard

    if processes == 1:
        return 0
    lists = [name for name, m in denoiser.named_modules() if isinstance(m, nn.ModuleList)]
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists if o != n)]
    blocks = [block for name in outer for block in denoiser.get_submodule(name)
              if any(True for _ in block.parameters())]
    for block in blocks:
        fully_shard(block)
    fully_shard(denoiser)
    log.info("fsdp: the denoiser sharded over %d processes (%d blocks and the rest)", processes, len(blocks))
    return len(blocks) + 1


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (stop requests reach all ranks at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def mean_over_processes(accelerator, value: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.reshape(1), "mean").reshape(())


def share_from(owner: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (the same names and shapes on every process) from process `owner` to all, in place."""
    from accelerate.utils import broadcast

    for name in sorted(tensors):
        t = tensors[name]
        t.copy_(broadcast(t.detach().clone(), from_process=owner))


def is_peer_lost(error: BaseException) -> bool:
    """Whether an error is a collective failing because another process of the run ended."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(error)
    return isinstance(error, dist_error) or (isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")))
