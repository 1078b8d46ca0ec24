"""Train a small MLP on the digits data with PyTorch DDP: gloo on CPUs, NCCL with each process on
``cuda:LOCAL_RANK`` when there are GPUs (``use_gpu=True``). Run by hand with
``torchrun --nproc-per-node 2 torch_ddp_digits.py --epochs 5``."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from digits import (
    load_digits_split,
    log_metrics,
    model_dir,
    output_dir,
    parse_training_args,
    resume_folder,
    save_input_example,
    warm_up_tracking,
    write_summary,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT = "checkpoint.pt"  # in outputs/, every epoch: what a resumed run continues from


def save_checkpoint(model, opt, epoch: int, loss: float) -> None:
    state = {"epoch": epoch, "loss": loss, "model": model.module.state_dict(), "optimizer": opt.state_dict()}
    partial = output_dir() / f"{CHECKPOINT}.partial"
    torch.save(state, partial)
    os.replace(partial, output_dir() / CHECKPOINT)  # whole or not at all, should the run be killed


def resume(model, opt, device) -> tuple[int, float]:
    """The epoch to start from and the last loss: 0 and nan, or after an earlier run's checkpoint."""
    folder = resume_folder()
    if folder is None or not (folder / CHECKPOINT).exists():
        return 0, float("nan")
    state = torch.load(folder / CHECKPOINT, map_location=device)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    print(f"resuming after epoch {state['epoch']} from {folder / CHECKPOINT}")
    return state["epoch"] + 1, state["loss"]


def main() -> None:
    args = parse_training_args(lr=0.05, batch_size=32)
    gpu = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    probe = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(probe)
    if rank == 0:
        warm_up_tracking()
    print(
        f"rank={rank} world_size={world} local_rank={os.environ['LOCAL_RANK']} allreduce_sum={probe.item()}"
    )

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    x_shard = torch.from_numpy(x_train[rank::world]).to(device)
    y_shard = torch.from_numpy(y_train[rank::world]).to(device)
    x_test_, y_test_ = torch.from_numpy(x_test).to(device), torch.from_numpy(y_test).to(device)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    model = DistributedDataParallel(net, device_ids=[device] if gpu else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    steps = len(x_shard) // args.batch_size  # equal on every rank: shards differ by at most one row
    first_epoch, mean_loss = resume(model, opt, device)

    for epoch in range(first_epoch, args.epochs):
        total = torch.zeros(1, device=device)
        for step in range(steps):
            batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
            opt.zero_grad()
            loss = loss_fn(model(x_shard[batch]), y_shard[batch])
            loss.backward()
            opt.step()
            total += loss.detach()
        dist.all_reduce(total)
        mean_loss = total.item() / (steps * world)
        with torch.no_grad():
            accuracy = (model(x_test_).argmax(1) == y_test_).float().mean()
        print(f"epoch={epoch} loss={mean_loss:.4f} accuracy={accuracy.item():.4f}")
        if rank == 0:
            log_metrics({"loss": mean_loss, "accuracy": accuracy.item()}, step=epoch)
            save_checkpoint(model, opt, epoch, mean_loss)
    with torch.no_grad():
        accuracy = (model(x_test_).argmax(1) == y_test_).float().mean()

    checksum = torch.cat([p.detach().flatten() for p in model.parameters()]).sum()
    sums = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(sums, checksum.reshape(1))
    print(f"rank={rank} weights_checksum={checksum.item():.6f}")
    if rank == 0:
        # TorchScript: the registered model loads without this script
        torch.jit.script(model.module.cpu()).save(model_dir() / "model.pt")
        save_input_example(x_test[:5])
        write_summary(
            {
                "world_size": world,
                "allreduce_sum": probe.item(),
                "final_loss": mean_loss,
                "accuracy": accuracy.item(),
                "weights_checksums": [s.item() for s in sums],
            }
        )
    # Tear down in an order that avoids gloo's intermittent abort at interpreter exit.
    del model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
