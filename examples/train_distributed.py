"""Model-parallel ArcFace with Partial FC: a DDP backbone and a class-sharded margin loss.

Runs on CPU (gloo) in well under 30 s::

    torchrun --nproc_per_node 2 examples/train_distributed.py
    torchrun --nproc_per_node 2 examples/train_distributed.py --sample-rate 1.0   # no sampling

and unchanged on GPUs (NCCL, one process per GPU). Each rank holds only its slice of the
classifier (``ShardedMarginLoss``); the backbone is replicated and wrapped in DDP. The loss
multiplies the embedding gradient by the world size, so after DDP's averaging the backbone
gets the gradient of the global-batch loss (see marginops.distributed).

The data are synthetic: every identity is a random point in input space, every sample a noisy
view of its identity, and each rank draws its own samples.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import marginops
from marginops.distributed import ShardedMarginLoss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=0.3, help="Partial FC rate (1 = all)")
    p.add_argument("--checkpoint", default="", help="save the full loss state here at the end")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)  # the same backbone on every rank (DDP also broadcasts rank 0's)

    C, D = args.num_classes, args.embedding_size
    identities = torch.randn(C, args.input_size, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees different samples

    def batch(n):
        labels = torch.randint(0, C, (n,), generator=data)
        noise = 0.6 * torch.randn(n, args.input_size, generator=data)
        return (identities[labels] + noise).to(device), labels.to(device)

    backbone = nn.Sequential(nn.Linear(args.input_size, 256), nn.ReLU(),
                             nn.Linear(256, D)).to(device)
    model = DistributedDataParallel(backbone)
    loss_fn = ShardedMarginLoss(marginops.ArcFaceLoss, D, C, sample_rate=args.sample_rate,
                                scale=32.0, margin=0.3, init_seed=0, device=device)
    # insightface's recipe: one SGD over backbone and weight shard. Unsampled rows get zero
    # gradient but momentum and weight decay still move them (see marginops.distributed).
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": loss_fn.parameters()}],
                          lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if rank == 0:
        print(f"world {world}: rank 0 owns classes [{loss_fn.class_start}, "
              f"{loss_fn.class_start + loss_fn.local_classes}) of {C}, sample_rate "
              f"{args.sample_rate}, backend {loss_fn.backend!r}", flush=True)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch_size)
        loss = loss_fn(model(x), y)  # the same global-batch loss on every rank
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step == 1 or step % 25 == 0):
            sampled = loss_fn.last_class_index
            extra = "" if sampled is None else f"  (rank 0 sampled {sampled.numel()} classes)"
            print(f"step {step:4d}  loss {loss.item():8.4f}{extra}", flush=True)

    model.eval()
    loss_fn.eval()
    with torch.no_grad():
        x, y = batch(256)
        top1 = (loss_fn.predict(model(x), k=1)[:, 0] == y).float().mean()
        dist.all_reduce(top1)
    state = loss_fn.full_state_dict(rank0_only=True)  # collective: every rank calls it
    if rank == 0:
        print(f"top-1 on fresh samples {top1.item() / world:.3f}; "
              f"{time.perf_counter() - start:.1f}s for {args.steps} steps", flush=True)
        if args.checkpoint:
            torch.save(state, args.checkpoint)  # loads into any world size, or ArcFaceLoss
            print(f"saved full weight {tuple(state['weight'].shape)} to {args.checkpoint}")
    # Tear down DDP before its process group: a DDP object outliving destroy_process_group()
    # can hang in its destructor with gloo.
    del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
