"""Train a small MLP on the digits data with Horovod for PyTorch. Run by hand with
``horovodrun -np 2 -H localhost:2 python torch_horovod_digits.py`` (or ``mpirun -np 2 ...``)."""

from __future__ import annotations

import socket

import horovod.torch as hvd
import torch
from digits import (
    launcher_rank,
    load_digits_split,
    log_metrics,
    model_dir,
    parse_training_args,
    save_input_example,
    warm_up_tracking,
    write_summary,
)
from torch import nn


def main() -> None:
    args = parse_training_args(lr=0.05, batch_size=32)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        warm_up_tracking()
    torch.manual_seed(rank)  # different on purpose: the broadcast below must make them equal
    probe = hvd.allreduce(torch.tensor([float(rank + 1)]), op=hvd.Sum, name="probe")
    print(
        f"rank={rank} size={size} local_rank={hvd.local_rank()} launcher_rank={launcher_rank()} "
        f"allreduce_sum={probe.item()} host={socket.gethostname()}"
    )

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    x_shard, y_shard = torch.from_numpy(x_train[rank::size]), torch.from_numpy(y_train[rank::size])
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * size, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    steps = len(x_shard) // args.batch_size
    steps = int(hvd.allreduce(torch.tensor(steps), op=hvd.Min, name="steps"))  # same count on every rank

    for epoch in range(args.epochs):
        total = torch.zeros(1)
        for step in range(steps):
            batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
            opt.zero_grad()
            loss = loss_fn(model(x_shard[batch]), y_shard[batch])
            loss.backward()
            opt.step()
            total += loss.detach()
        mean_loss = hvd.allreduce(total / steps, name=f"loss{epoch}").item()
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(x_test)).argmax(1) == torch.from_numpy(y_test)).float().mean()
        print(f"epoch={epoch} loss={mean_loss:.4f} accuracy={accuracy.item():.4f}")
        if rank == 0:
            log_metrics({"loss": mean_loss, "accuracy": accuracy.item()}, step=epoch)

    checksum = torch.cat([p.detach().flatten() for p in model.parameters()]).sum().reshape(1)
    checksums = hvd.allgather(checksum, name="checksums")
    print(f"rank={rank} weights_checksum={checksum.item():.6f}")
    if rank == 0:
        # TorchScript: the registered model loads without this script
        torch.jit.script(model).save(model_dir() / "model.pt")
        save_input_example(x_test[:5])
        write_summary(
            {
                "size": size,
                "allreduce_sum": probe.item(),
                "final_loss": mean_loss,
                "accuracy": accuracy.item(),
                "weights_checksums": checksums.tolist(),
            }
        )


if __name__ == "__main__":
    main()
