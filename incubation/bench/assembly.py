"""Why does an assembled model start below its hybrids? Accuracy of every mix of meta blocks and
incubated modules, from a finished study (incubation bench study) or run dir, on its evaluation data.

    incubation bench assembly --study runs/study-depth24 --budget 2 --seed 0 [--variant random]

For each Deep Incubation variant of the point it prints, on the study's evaluation split (the
validation split with --val-size): the meta model alone, each hybrid (the meta model with only
module i), the meta model with every module but i (leave one out), and all modules assembled
before any fine-tuning. A module that is fine alone but costs accuracy once its neighbours are
modules too was fitted to the meta blocks around it, not to the modules that replace them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

from incubation import ViTConfig, deep
from incubation.bench import study
from incubation.train import evaluate

VARIANTS = {"random": "deep", "lemon": "deep-lemon", "metatrain": "deep-metatrain"}   # --variant -> the study's method


class Mixed(nn.Module):
    """The meta model with the modules in `use` substituted (module i: its target blocks; module
    0 brings the stem, module K-1 the final norm and head)."""

    def __init__(self, meta: nn.Module, assembled: nn.Module, spans: list, use: set):
        super().__init__()
        self.meta, self.assembled, self.spans, self.use = meta, assembled, spans, use

    def forward(self, x):
        K = len(self.spans)
        x = (self.assembled if 0 in self.use else self.meta).embed(x)
        for k in range(K):
            blocks = [self.assembled.blocks[b] for b in self.spans[k]] if k in self.use else [self.meta.blocks[k]]
            for block in blocks:
                x = block(x)
        return (self.assembled if K - 1 in self.use else self.meta).head_logits(x)


def diagnose(meta_path: str, module_paths: list, eval_set, batch_size: int = 500) -> dict:
    """Top-1 % of the meta model, each hybrid, each leave-one-out mix and the assembled model."""
    meta, md, _ = deep.load_meta(meta_path)
    target_cfg = ViTConfig.from_dict(md["target_config"])
    assembled = deep.assemble(target_cfg, module_paths, sizes=md["sizes"]).eval()
    spans, K = deep.split_modules(target_cfg, md["K"], md["sizes"]), md["K"]
    meta.eval()

    def acc(use):
        return evaluate(Mixed(meta, assembled, spans, set(use)), eval_set, batch_size)["acc"]

    with torch.no_grad():
        return {"meta": acc(()), "hybrid": [acc((i,)) for i in range(K)],
                "all_but": [acc(tuple(j for j in range(K) if j != i)) for i in range(K)],
                "assembled": acc(tuple(range(K)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="incubation bench assembly", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--study", required=True, help="a study's --out")
    p.add_argument("--budget", default="2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                   help="random, lemon, metatrain (default: every one run)")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args(argv)
    cfg, budget = study._load_config(args.study), float(args.budget)
    eval_set = study.data(cfg, args.study).eval_set   # the validation split with --val-size
    results = {}
    for variant in args.variant or [v for v, m in VARIANTS.items() if m in cfg.methods]:
        meta, *modules, _ = [os.path.join(d, "final") for d in study.method_dirs(cfg, args.study, VARIANTS[variant],
                                                                                 budget, args.seed)]
        results[variant] = r = diagnose(meta, modules, eval_set)
        print(f"{variant}: meta {r['meta']:.2f} | hybrids {' '.join(f'{a:.2f}' for a in r['hybrid'])} | "
              f"all but i {' '.join(f'{a:.2f}' for a in r['all_but'])} | assembled {r['assembled']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"study": args.study, "budget": budget, "seed": args.seed, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
