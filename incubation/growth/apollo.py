"""Apollo (Pan et al., AAAI 2024): progressive depth training of a ViT with shared blocks.

Training runs in stages with N unique blocks (e.g. 1, 3, 6, 12) for a target of depth L:

  * LVPS (low-value-prioritized sampling): every optimizer step draws x ~ U(1e-6, 1) and
    y = m / (x + n), calibrated so y = r + 0.4 at x -> 0 and y = 0.6 at x = 1 (r = L / N):
    n = 0.6 / (r - 0.2), m = (r + 0.4) * n. y is clipped to [1, r] and the step trains a
    network of depth L' = floor(y * N), in [N, L], shallow depths being the most likely.
  * Weight sharing: position t of the L' blocks runs unique block floor(t * N / L')
    (consecutive repeats; the gradients of the repeats add up in the one shared tensor).
  * Interpolation at a stage switch N_old -> N_new: new block j starts as a copy of old block
    floor(j * N_old / N_new).
  * Evaluation always runs the full depth L (with the current sharing).

The schedule (`apollo_schedule`, ApolloViT's default): the authors' pretraining scripts
(run_pretrain_*_apollo*.sh: --apollo_layers 1,3,6,12 --apollo_epoch_list 2,4,10,40) train
L/12, L/4, L/2 and L unique blocks and switch after 5 %, 10 % and 25 % of training, so the
full-depth stage gets the last 75 %. `even_switch_steps` (schedule="even") gives every stage
the same number of steps instead.

Parameters and the optimizer: `ApolloViT` wraps a VisionTransformer of the target depth L, so
all L blocks are parameters from the start and the optimizer holds them all. The unique blocks
live in `slots` (indices into vit.blocks), recorded in the persistent buffer `unique_slots` so
checkpoints carry the stage. A slot not in use gets no gradient, so AdamW leaves it alone. At
a switch every old block keeps its slot (and its optimizer moments) as the first of its
copies, and the other copies go to never-used slots, which the optimizer starts fresh.

Depths are drawn from a generator seeded by (seed, step), so a resumed run samples the same
depths as an uninterrupted one. Under DDP, slots not in use get no gradient: wrap with
find_unused_parameters=True while N < L.
"""
from __future__ import annotations

import bisect
import copy
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..nn.vit import VisionTransformer, ViTConfig
from ..train import TrainResult, train
from ..train.checkpoint import save_checkpoint
from ..weights import load_into

__all__ = ["ApolloViT", "apollo_hook", "apollo_schedule", "train_apollo", "lvps_depth", "shared_blocks", "interpolation_sources",
           "even_switch_steps", "default_stages", "APOLLO_STAGE_FRACTIONS", "APOLLO_SWITCH_FRACTIONS"]

LVPS_X_LOW = 1e-6  # x ~ U(1e-6, 1)
# The authors' schedule, as exact fractions (numerator, denominator): unique blocks of each
# stage as a fraction of the depth, and the steps after which stages 2, 3 and 4 begin.
APOLLO_STAGE_FRACTIONS = ((1, 12), (1, 4), (1, 2), (1, 1))
APOLLO_SWITCH_FRACTIONS = ((1, 20), (1, 10), (1, 4))
SCHEDULES = ("apollo", "even")


# --------------------------------------------------------------------------------------
# the three rules
# --------------------------------------------------------------------------------------
def lvps_depth(x: float, num_unique: int, depth: int) -> int:
    """LVPS: the depth trained for a draw x in [1e-6, 1) with `num_unique` blocks of `depth`."""
    r = depth / num_unique
    if num_unique >= depth:
        return depth
    n = 0.6 / (r - 0.2)
    m = (r + 0.4) * n
    y = m / (x + n)
    if y >= r:
        return depth
    if y <= 1.0:
        return num_unique
    return min(depth, max(num_unique, math.floor(y * num_unique)))


def shared_blocks(num_unique: int, depth: int) -> list[int]:
    """The unique block run at each of `depth` positions: floor(t * N / depth)."""
    return [t * num_unique // depth for t in range(depth)]


def interpolation_sources(n_old: int, n_new: int) -> list[int]:
    """At a stage switch, new block j is initialised from old block floor(j * n_old / n_new)."""
    return [j * n_old // n_new for j in range(n_new)]


def default_stages(depth: int) -> list[int]:
    """Unique-block counts of the equal-length schedule (ApolloViT(schedule="even")) when no
    stages are given: depth/4, depth/2, depth. Apollo's own stages come from `apollo_schedule`."""
    return sorted({max(1, depth // 2 ** k) for k in range(3)})


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _round_half_up(n: int, fraction: tuple[int, int]) -> int:
    """n * a / b rounded to the nearest integer, halves up (exact integer arithmetic)."""
    a, b = fraction
    return (2 * n * a + b) // (2 * b)


def _apollo_plan(depth: int, total_steps: int) -> tuple[list[int], list[int]]:
    values = [max(1, _round_half_up(depth, f)) for f in APOLLO_STAGE_FRACTIONS]
    bounds = [_round_half_up(total_steps, f) for f in APOLLO_SWITCH_FRACTIONS]
    stages, switches = [values[0]], []
    for value, step in zip(values[1:], bounds):
        if value != stages[-1]:  # a stage equal to the previous one just continues it
            stages.append(value)
            switches.append(step)
    return stages, switches


def _valid_switches(switches: Sequence[int], total_steps: int) -> bool:
    return all(a < b for a, b in zip([0] + list(switches), list(switches) + [total_steps]))


def apollo_schedule(depth: int, total_steps: int) -> tuple[list[int], list[int]]:
    """(stages, switch_steps) of the authors' Apollo schedule for a target of `depth` blocks
    trained for `total_steps` optimizer steps (ApolloViT's default).

    stages: the sorted distinct values of max(1, round(depth * f)) for f in 1/12, 1/4, 1/2, 1
    (halves rounded up). switch_steps: stages 2, 3 and 4 begin after round(5 %), round(10 %)
    and round(25 %) of total_steps. Where values collapse (small depths, e.g. depth 4 gives
    1, 1, 2, 4), the stage keeps running: the switch into an equal value is dropped, and every
    distinct value begins where it begins in the four-stage schedule (depth 4: stages [1, 2, 4]
    switching after 10 % and 25 %). depth 12, 400 steps: ([1, 3, 6, 12], [20, 40, 100]).

    Raises ValueError unless every stage gets at least one step (total_steps >= 15 always
    suffices)."""
    depth, total_steps = _positive("depth", depth), _positive("total_steps", total_steps)
    stages, switches = _apollo_plan(depth, total_steps)
    if not _valid_switches(switches, total_steps):
        least = next(t for t in range(total_steps + 1, 10 ** 6)
                     if _valid_switches(_apollo_plan(depth, t)[1], t))
        raise ValueError(f"total_steps={total_steps} is too few for Apollo's schedule of depth {depth}: stages "
                         f"{stages} would switch at steps {switches} (after 5 %, 10 %, 25 %), leaving a stage "
                         f"without steps; use at least {least} steps, or give switch_steps "
                         f"(e.g. even_switch_steps)")
    return stages, switches


def even_switch_steps(total_steps: int, num_stages: int) -> list[int]:
    """Switch steps giving every stage the same number of steps (for ApolloViT)."""
    if num_stages < 1 or total_steps < num_stages:
        raise ValueError(f"need total_steps ({total_steps}) >= num_stages ({num_stages}) >= 1")
    return [round(i * total_steps / num_stages) for i in range(1, num_stages)]


# --------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------
def _ints(name: str, values) -> tuple[int, ...]:
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"{name} must be integers, got {values!r}")
    values = tuple(int(v) for v in values)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {values}")
    return values


def _schedule(depth: int, stages, switch_steps, total_steps, schedule) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """ApolloViT's (stages, switch_steps) from its arguments (see the class docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if switch_steps is not None:
        if total_steps is not None:
            raise ValueError("give either switch_steps or total_steps (which derives them), not both")
        if stages is None:
            raise ValueError("switch_steps needs the stages they switch between")
        return _ints("stages", stages), _ints("switch_steps", switch_steps)
    if total_steps is None:
        raise ValueError("ApolloViT needs its schedule: total_steps (schedule 'apollo' or 'even'), "
                         "or stages and switch_steps")
    if schedule == "apollo":
        own, switches = apollo_schedule(depth, total_steps)
        if stages is not None and _ints("stages", stages) != tuple(own):
            raise ValueError(f"schedule='apollo' sets the stages itself ({own} for depth {depth}), got "
                             f"{tuple(stages)}: use schedule='even' or give switch_steps for other stages")
        return tuple(own), tuple(switches)
    stages = _ints("stages", default_stages(depth) if stages is None else stages)
    return stages, _ints("switch_steps", even_switch_steps(_positive("total_steps", total_steps), len(stages)))


def _vit_flops(config: ViTConfig, depth: int) -> int:
    return config.replace(depth=depth).flops_per_image()


class ApolloViT(nn.Module):
    """Apollo training mode of a VisionTransformer of the target depth L.

    The schedule, either explicit or from the run's length:
      * stages and switch_steps: stages are unique-block counts, strictly increasing, in [1, L]
        (e.g. (1, 3, 6, 12)); switch_steps are the optimizer steps at which stages 2, 3, ...
        begin (len(stages) - 1 values).
      * total_steps (no switch_steps): schedule="apollo" (the default) is the authors'
        `apollo_schedule(L, total_steps)`, which sets the stages too (stages, if given, must
        equal its own); schedule="even" gives `stages` (default `default_stages(L)`) equal
        numbers of steps (`even_switch_steps`).
    Pass `apollo_hook` to the engine's hooks: before each optimizer step it grows the model at
    stage switches and samples the step's depth. `export()` gives the plain depth-L ViT.
    """

    def __init__(self, model: VisionTransformer, stages: Optional[Sequence[int]] = None,
                 switch_steps: Optional[Sequence[int]] = None, seed: int = 0, *,
                 total_steps: Optional[int] = None, schedule: str = "apollo"):
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"ApolloViT wraps an incubation.VisionTransformer, got {type(model).__name__}")
        depth = model.config.depth
        stages, switch_steps = _schedule(depth, stages, switch_steps, total_steps, schedule)
        if not stages or stages[0] < 1 or stages[-1] > depth:
            raise ValueError(f"stages must be unique-block counts in [1, depth={depth}], got {stages}")
        if len(switch_steps) != len(stages) - 1:
            raise ValueError(f"switch_steps needs one step per stage switch ({len(stages) - 1}), "
                             f"got {len(switch_steps)}")
        if switch_steps and switch_steps[0] < 1:
            raise ValueError(f"switch_steps must be positive, got {switch_steps}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.vit = model
        self.stages, self.switch_steps, self.seed = stages, switch_steps, seed
        self.schedule = schedule if total_steps is not None else "explicit"
        slots = torch.full((depth,), -1, dtype=torch.long)
        slots[:stages[0]] = torch.arange(stages[0])
        self.register_buffer("unique_slots", slots)
        self.depth: Optional[int] = None  # the sampled depth of the current training step
        self._flops_steps, self._flops_sum = 0, 0  # forward flops of the steps prepared so far

    # -- state --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The classes of the wrapped ViT's head (what the training engine's mixup needs)."""
        return self.vit.num_classes

    @property
    def full_depth(self) -> int:
        return self.vit.config.depth

    @property
    def slots(self) -> list[int]:
        """vit.blocks index of each unique block, in order."""
        return [s for s in self.unique_slots.tolist() if s >= 0]

    @property
    def num_unique(self) -> int:
        return len(self.slots)

    def block_slots(self, depth: int) -> list[int]:
        """vit.blocks index run at each position of a forward pass of `depth` blocks."""
        slots = self.slots
        return [slots[u] for u in shared_blocks(len(slots), depth)]

    # -- schedule -----------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        """Unique-block count of the stage that `step` (0-based optimizer step) belongs to."""
        return self.stages[bisect.bisect_right(self.switch_steps, step)]

    def depth_at(self, step: int) -> int:
        """The LVPS depth of `step`: a pure function of (seed, step), hence resumable."""
        x = np.random.default_rng([self.seed, step]).uniform(LVPS_X_LOW, 1.0)
        return lvps_depth(float(x), self.stage_at(step), self.full_depth)

    def prepare_step(self, step: int) -> None:
        """Grow to the stage of `step` if needed and sample its depth (what the hook does)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        n = self.stage_at(step)
        if n != self.num_unique:
            self.grow(n)
        self.depth = self.depth_at(step)
        if step + 1 != self._flops_steps:  # else: the same step prepared again, already counted
            if step != self._flops_steps:  # resumed or restarted: recount the earlier steps
                self._flops_sum = sum(_vit_flops(self.vit.config, self.depth_at(s)) for s in range(step))
            self._flops_sum += _vit_flops(self.vit.config, self.depth)
            self._flops_steps = step + 1

    @torch.no_grad()
    def grow(self, num_unique: int) -> None:
        """Stage switch: new block j <- old block floor(j * N_old / N_new)."""
        old = self.slots
        if not len(old) <= num_unique <= self.full_depth:
            raise ValueError(f"cannot grow from {len(old)} to {num_unique} unique blocks "
                             f"(depth {self.full_depth}); Apollo only grows")
        fresh = [s for s in range(self.full_depth) if s not in old]
        new, taken = [], set()
        for source in interpolation_sources(len(old), num_unique):
            slot = old[source]
            if slot in taken:  # a later copy of the same old block: a never-used slot
                slot = fresh.pop(0)
                self.vit.blocks[slot].load_state_dict(self.vit.blocks[old[source]].state_dict())
            taken.add(slot)
            new.append(slot)
        self.unique_slots.fill_(-1)
        self.unique_slots[:num_unique] = torch.tensor(new)

    # -- model --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.depth is None:
            raise RuntimeError("ApolloViT in training mode has no sampled depth: pass "
                               "incubation.growth.apollo_hook to train(hooks=...) or call prepare_step(step)")
        vit = self.vit
        x = vit.embed(x)
        for slot in self.block_slots(self.depth if self.training else self.full_depth):
            x = vit.blocks[slot](x)
        return vit.head_logits(x)

    def flops_per_image(self) -> int:
        """Forward FLOPs per training image averaged over the steps prepared so far (the depth
        varies per step); the full model's before training."""
        if not self._flops_steps:
            return self.vit.flops_per_image()
        return round(self._flops_sum / self._flops_steps)

    def export(self) -> VisionTransformer:
        """The grown model as a plain VisionTransformer of depth L (a copy; eval-mode function
        identical to this wrapper's)."""
        state = {k: v for k, v in self.vit.state_dict().items() if not k.startswith("blocks.")}
        for t, slot in enumerate(self.block_slots(self.full_depth)):
            for key, value in self.vit.blocks[slot].state_dict().items():
                state[f"blocks.{t}.{key}"] = value
        out = copy.deepcopy(self.vit)
        out.load_state_dict(state)
        return out

    def extra_repr(self) -> str:
        return (f"stages={self.stages}, switch_steps={self.switch_steps}, schedule={self.schedule}, "
                f"seed={self.seed}, num_unique={self.num_unique}")


def apollo_hook(step: int, model: nn.Module) -> None:
    """Engine hook (train(hooks=[apollo_hook])): grow at stage switches, sample the depth."""
    target = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not isinstance(target, ApolloViT):
        raise TypeError(f"apollo_hook needs an ApolloViT model, got {type(target).__name__}")
    target.prepare_step(step)


# --------------------------------------------------------------------------------------
# a whole Apollo run
# --------------------------------------------------------------------------------------
def train_apollo(target: ViTConfig, train_set, eval_set, cfg, out_dir: str, *, stages: Optional[Sequence[int]] = None,
                 switch_fractions: Optional[Sequence[float]] = None, schedule: str = "apollo",
                 initial_checkpoint: Optional[str] = None, stage: str = "grow") -> tuple[TrainResult, str]:
    """Train `target` the Apollo way for cfg.steps steps into `out_dir` (the engine's files) and
    write the grown plain ViT to out_dir/model.safetensors. Returns (result, that path).

    The schedule: `switch_fractions` (the fractions of the steps after which stages 2, 3, ...
    begin, e.g. 0.05, 0.10, 0.25) with `stages`; else ApolloViT's `schedule` ("apollo": the
    authors', "even": equal stages) over cfg.steps. `initial_checkpoint`: weights for the
    target before Apollo's first stage (any format incubation.weights reads)."""
    if cfg.steps is None:
        raise ValueError("train_apollo needs cfg.steps: the schedule is laid out over them")
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(target)
    if initial_checkpoint is not None:
        load_into(vit, initial_checkpoint)
    if switch_fractions is not None:
        if stages is None:
            raise ValueError("switch_fractions need the stages they switch between")
        if list(switch_fractions) != sorted(switch_fractions) or not all(0 < f < 1 for f in switch_fractions):
            raise ValueError(f"switch fractions must increase within (0, 1), got {list(switch_fractions)}")
        switches = [max(1, round(f * cfg.steps)) for f in switch_fractions]
        model = ApolloViT(vit, stages, switches, seed=cfg.seed)
    else:
        model = ApolloViT(vit, stages, total_steps=cfg.steps, schedule=schedule, seed=cfg.seed)
    metadata = {"stage": stage, "stages": list(model.stages), "switch_steps": list(model.switch_steps),
                "target_config": target.to_dict()}
    if initial_checkpoint is not None:
        metadata["initial_checkpoint"] = os.path.abspath(initial_checkpoint)
    result = train(model, train_set, eval_set, cfg, out_dir, stage=stage, hooks=[apollo_hook], metadata=metadata)
    path = save_checkpoint(os.path.join(out_dir, "model"), model.export().state_dict(),
                           {"stage": stage, "target_config": target.to_dict(), "eval_acc": result.eval_acc})
    return result, path
