"""Death on the data against the whole training split: train a ReLU MLP into dying (SGD at a large
lr, dropout), then compare the dead fraction the probes log (probes.death_examples images) and the
probe batch's with the fraction over every training image, computed here independently (one plain
forward pass per image batch, dropout off, a unit alive if any image makes it positive).

    python scripts/check_death.py [--train-size 20000] [--lr 0.5] [--dropout 0.5] [--momentum 0.9] [--every 100]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from cnnlab.config import config_dir, validate
from cnnlab.instruments.probes import Probes, examples_needed
from cnnlab.train.data import load_data
from cnnlab.train.models import build_model


def whole_split_dead(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Per ReLU layer: the share of units no training image makes positive."""
    model.eval()  # no BatchNorm here; eval switches dropout off
    alive: dict[int, torch.Tensor] = {}
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(lambda m, i, o, k=k: alive.__setitem__(
        k, alive.get(k, torch.zeros(o.shape[1], dtype=torch.bool)) | (o > 0).any(dim=0))) for k, m in enumerate(relus)]
    with torch.no_grad():
        for part in images.split(1024):
            model(part)
    for handle in handles:
        handle.remove()
    model.train()
    return [1 - alive[k].float().mean().item() for k in range(len(relus))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="steps between comparisons")
    parser.add_argument("--death-examples", type=int, default=None, help="probes.death_examples (default: configs/)")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("train", overrides=["dataset=fake", f"dataset.train_size={args.train_size}", "trainer.device=cpu",
                                          f"model.dropout={args.dropout}",
                                          *([f"probes.death_examples={args.death_examples}"] if args.death_examples else [])])
    run = validate(cfg)
    data = load_data(run.dataset, 128, 512, torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    model = build_model(run.model, run.activation, data.input_shape, data.num_classes)
    images, labels = data.train.sample(10**9, seed=1)  # every training image
    probes = Probes(model, data.train.sample(examples_needed(run.probes), seed=0), run.probes, last_step=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    print(f"{len(images)} training images; probes.death_examples={run.probes.death_examples}, "
          f"probe batch {run.probes.batch_size}")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            data_ = {m.tag: round(m.value.item(), 3) for m in probes.on_data() if m.tag.startswith("dead_fraction/act")}
            batch = {m.tag: round(m.value.item(), 3) for m in probes.measure(step)
                     if m.tag.startswith("dead_on_batch/act")}
            whole = [round(value, 3) for value in whole_split_dead(model, images)]
            print(f"step {step}: whole split {whole}  on the data {list(data_.values())}  "
                  f"probe batch {list(batch.values())}")
        part = slice(step * 128 % (len(images) - 128), step * 128 % (len(images) - 128) + 128)
        optimizer.zero_grad()
        F.cross_entropy(model(images[part]), labels[part]).backward()
        optimizer.step()


if __name__ == "__main__":
    main()
