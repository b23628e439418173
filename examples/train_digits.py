"""Swap marginops' fused ArcFace loss into a real training loop, next to the naive reference.

Data: scikit-learn's bundled digits (1 797 8×8 images, 10 classes; no download). We hold out
IMAGES, not classes: a stratified 30 % of the images of every digit is never trained on. All ten
classes are therefore known at test time, which is what closed-set identification needs.

Two identical copies of a small embedding MLP (64 → 128 → 32, same initial weights, same ArcFace
classifier initialisation, same batches in the same order, same optimiser) are trained side by
side: one with ``marginops.ArcFaceLoss`` on the fused backend (``--backend auto``: cpp when it is
built, else the chunked torch backend), one with ``marginops.reference.arcface_loss`` (full logits +
F.cross_entropy). Their per-step losses must agree within ``--atol`` + ``--rtol``·|reference| over
the whole run: the script asserts it and prints the largest deviation.

Then, on the held-out images and with the fused-trained network:
* verification: cosine scores of every pair of held-out images (genuine = same digit), TAR at
  FAR = 1e-3 and 1e-2, and LFW-style 10-fold accuracy on a balanced sample of pairs;
* identification: rank-1 / rank-5 accuracy of each held-out image against a gallery of the class
  centres of the training embeddings, through the fused top-k (no logits) — chance is 10 % / 50 %.

    python examples/train_digits.py                 # ~300 steps, well under a minute on CPU
    python examples/train_digits.py --steps 30 --backend torch --seed 1

Needs scikit-learn (the data set): ``pip install -e ".[examples]"``.

The last line printed is ``RESULT {json}`` for scripts and tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

try:
    import marginops
except ImportError:   # running from a checkout without PYTHONPATH
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import marginops
from marginops import eval as mev
from marginops import reference


def load_data(seed: int, test_fraction: float = 0.3):
    """Digits scaled to [0, 1]; a stratified split of the images (every class in both parts)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        sys.exit(f"train_digits.py needs scikit-learn for its bundled digits data set ({err}): "
                 "pip install 'marginops[examples]' (or pip install scikit-learn)")

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
            torch.from_numpy(y_te))


def make_net(embedding_size: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, embedding_size))


def pair_scores(emb: torch.Tensor, labels: torch.Tensor):
    """Cosine scores of every unordered pair of rows: (genuine scores, impostor scores)."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = mev.cosine_scores(emb[i], emb[j])
    same = labels[i] == labels[j]
    return scores[same], scores[~same]


def balanced_pairs(genuine: torch.Tensor, impostor: torch.Tensor, n: int, seed: int):
    """n genuine + n impostor scores, shuffled (an LFW-like balanced list) for k-fold accuracy."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, len(genuine), len(impostor))
    gen = genuine[torch.randperm(len(genuine), generator=g)[:n]]
    imp = impostor[torch.randperm(len(impostor), generator=g)[:n]]
    scores = torch.cat([gen, imp])
    same = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    order = torch.randperm(2 * n, generator=g)
    return scores[order], same[order]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--backend", default="auto",
                   help="marginops backend for the fused copy: auto, torch, cpp, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scale", type=float, default=16.0, help="ArcFace s (10 classes: 16 is ample)")
    p.add_argument("--margin", type=float, default=0.3, help="ArcFace m in radians")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="allowed |fused - reference| per step: atol + rtol·|reference|")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a tiny MLP gains nothing from more, and on a shared "
                        "machine they only wait for each other)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    num_classes, emb_size = 10, 32

    net_fused = make_net(emb_size)
    loss_fused = marginops.ArcFaceLoss(emb_size, num_classes, scale=args.scale,
                                       margin=args.margin, backend=args.backend)
    net_ref = copy.deepcopy(net_fused)                          # same initial weights
    weight_ref = nn.Parameter(loss_fused.weight.detach().clone())
    backend = marginops.core.resolve_backend(args.backend, x_tr.device)

    opt_fused = torch.optim.Adam([*net_fused.parameters(), *loss_fused.parameters()], lr=args.lr)
    opt_ref = torch.optim.Adam([*net_ref.parameters(), weight_ref], lr=args.lr)

    order = torch.Generator().manual_seed(args.seed + 1)
    losses_fused, losses_ref = [], []
    perm, pos = torch.randperm(len(y_tr), generator=order), 0
    for step in range(args.steps):
        if pos + args.batch_size > len(perm):                   # a new epoch, same for both
            perm, pos = torch.randperm(len(y_tr), generator=order), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        xb, yb = x_tr[idx], y_tr[idx]

        loss_a = loss_fused(net_fused(xb), yb)
        opt_fused.zero_grad()
        loss_a.backward()
        opt_fused.step()

        loss_b = reference.arcface_loss(net_ref(xb), weight_ref, yb, scale=args.scale,
                                        margin=args.margin)
        opt_ref.zero_grad()
        loss_b.backward()
        opt_ref.step()

        losses_fused.append(loss_a.item())
        losses_ref.append(loss_b.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss fused ({backend}) {loss_a.item():.6f}  "
                  f"reference {loss_b.item():.6f}")

    a, b = np.array(losses_fused), np.array(losses_ref)
    dev = np.abs(a - b)
    rel_dev = dev / np.maximum(np.abs(b), 1e-12)
    excess = dev / (args.atol + args.rtol * np.abs(b))     # <= 1 everywhere: within tolerance
    worst = int(excess.argmax())
    print(f"per-step loss agreement over {args.steps} steps: max |fused - reference| = "
          f"{dev.max():.3e} (step {int(dev.argmax())}), max relative {rel_dev.max():.3e}; "
          f"tolerance atol {args.atol:g} + rtol {args.rtol:g}·|reference|, worst step {worst} "
          f"uses {excess.max():.1%} of it")
    assert excess.max() <= 1.0, (
        f"the fused and reference runs diverged at step {worst}: |{a[worst]:.6g} - "
        f"{b[worst]:.6g}| > {args.atol:g} + {args.rtol:g}·|reference|")

    # ---- evaluation on held-out images, with the fused-trained network
    net_fused.eval()
    with torch.no_grad():
        emb_tr, emb_te = net_fused(x_tr), net_fused(x_te)
    genuine, impostor = pair_scores(emb_te, y_te)
    tars = {far: mev.tar_at_far(genuine, impostor, far) for far in (1e-3, 1e-2)}
    kf_scores, kf_same = balanced_pairs(genuine, impostor, 3000, args.seed)
    kfold = mev.kfold_accuracy(kf_scores, kf_same, folds=10)
    gallery = mev.class_centres(emb_tr, y_tr, num_classes)
    ident = mev.identification_accuracy(emb_te, y_te, gallery, k=(1, 5), backend=args.backend)

    print(f"held out: {len(y_te)} images (30% of each digit, never trained on); "
          f"{len(genuine)} genuine / {len(impostor)} impostor pairs")
    for far, r in tars.items():
        print(f"verification  TAR@FAR={far:g}: {r.tar:.4f}  (achieved FAR {r.far:.2e}, "
              f"threshold {r.threshold:.4f})")
    print(f"verification  10-fold accuracy ({len(kf_scores)} balanced pairs): "
          f"{kfold.mean:.4f} ± {kfold.std:.4f}")
    print(f"identification vs class centres: rank-1 {ident[1]:.4f}, rank-5 {ident[5]:.4f} "
          f"(chance 0.1 / 0.5)")
    result = {
        "backend": backend, "steps": args.steps, "seed": args.seed,
        "max_abs_loss_dev": float(dev.max()), "max_rel_loss_dev": float(rel_dev.max()),
        "tolerance_used": float(excess.max()), "atol": args.atol, "rtol": args.rtol,
        "first_loss": float(a[0]), "last_loss": float(a[-1]),
        "tar_at_far_1e-3": tars[1e-3].tar, "tar_at_far_1e-2": tars[1e-2].tar,
        "kfold_accuracy": kfold.mean, "kfold_std": kfold.std,
        "rank1": ident[1], "rank5": ident[5], "seconds": time.perf_counter() - t0,
    }
    print(f"done in {result['seconds']:.1f} s")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
