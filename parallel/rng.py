"""Dropout randomness that knows the parallel layout (Megatron's model-parallel RNG tracker, made
stateless per call).

A dropout mask must be *shared* by ranks that hold copies of the same activation and *independent*
wherever ranks hold different elements, or a layout changes the model being trained:

    stream       seed derived from                    used for
    replicated   (seed, pp, dp)            same on every tp rank of a (pp, dp) coordinate: the
                                           residual stream and embedding output, which every tp
                                           rank holds whole (no sequence parallelism)
    tp_local     (seed, pp, dp, tp)        different on every rank: attention probabilities of
                                           this rank's heads, and the residual stream when
                                           sequence parallelism gives each tp rank its own slice

dp is the data-parallel rank, dp = edp * ep + ep_rank, so expert-parallel ranks (which read
different tokens) differ too; pp separates pipeline stages, which would otherwise repeat one
stream in different layers. Megatron seeds its default stream with (seed, pp) and its
model-parallel stream with (seed, pp, tp); adding dp here makes the global batch's masks
independent, as they are in one process, so every layout trains with the same distribution.

Where Megatron swaps generator states in and out (and must save and restore them around
activation recompute), every mask here is drawn from a generator seeded afresh by

    seed(stream, key, site) = mix(stream base, key, crc32(site)),   key = mix(step, chunk, call)

`key` is taken once per forward of a model chunk (`ParallelRNG.next_key`; `call` counts that
chunk's forwards in the step) and passed *into* the blocks, so a recomputed block draws exactly
the masks of its first forward, a resumed run draws those of the uninterrupted one, a second pass
over the step's micro-batches (the global_batch routing count) draws those of the first once the
step is restarted, and nothing global is kept between calls. SDPA's fused attention dropout
draws from the device's default generator, so `DropoutKey.fork` reseeds that generator for the
one call and restores its state afterwards.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch

REPLICATED, TP_LOCAL = "replicated", "tp_local"
STREAMS = (REPLICATED, TP_LOCAL)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a bijective 64-bit scrambler."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed from integers, equal on every process for equal inputs (unlike hash())."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def site_id(site: str) -> int:
    """A dropout site's name ("layers.3.attn") as a stable integer."""
    return zlib.crc32(site.encode())


@dataclass(frozen=True)
class DropoutKey:
    """The seeds one forward pass of a model chunk draws its masks from (see the module docstring).
    Frozen and plain, so activation checkpointing passes it to the recomputed block unchanged."""

    replicated: int  # stream base mixed with the call key
    tp_local: int

    def seed(self, stream: str, site: str) -> int:
        if stream not in STREAMS:
            raise ValueError(f"dropout stream {stream!r} is not one of {list(STREAMS)}")
        return mix(getattr(self, stream), site_id(site))

    def dropout(self, x: torch.Tensor, p: float, stream: str, site: str) -> torch.Tensor:
        """Inverted dropout: keep each element with probability 1 - p and scale it by 1 / (1 - p),
        so E[out] = x. The mask is bool (1 byte per element kept for backward)."""
        if p == 0.0:
            return x
        gen = torch.Generator(device=x.device).manual_seed(self.seed(stream, site))
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= p  # x.shape, bool
        return x.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))

    @contextlib.contextmanager
    def fork(self, stream: str, site: str, device: torch.device):
        """Run the body (e.g. SDPA with dropout_p > 0) with the device's default generator seeded
        for this site; its previous state is restored afterwards, so the body leaves no trace."""
        gen = default_generator(device)
        saved = gen.get_state()
        gen.manual_seed(self.seed(stream, site))
        try:
            yield
        finally:
            gen.set_state(saved)


def default_generator(device: torch.device) -> torch.Generator:
    """The generator that torch's own random kernels (SDPA dropout) read on `device`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type != "cpu":
        raise ValueError(f"dropout randomness on device type {device.type!r} is not supported: "
                         f"use cpu or cuda")
    return torch.default_generator


class ParallelRNG:
    """This rank's dropout seeds: the two stream bases from (seed, coordinates) and a call counter.

    One instance is shared by the chunks of a rank and passed to them explicitly. The trainer calls
    `start_step(step)` before each optimizer step; each training forward of a chunk then takes
    `next_key(chunk)`, so the masks of step s, the c-th forward of a chunk are a function of
    (seed, coordinates, s, chunk, c, site) alone: reproducible after a resume, the same in any
    schedule's order of chunk calls, and independent of everything else the run has drawn.
    """

    def __init__(self, seed: int, ctx):
        self.seed = int(seed)
        self.coords = {"pp": ctx.pp_rank, "dp": ctx.dp_rank, "tp": ctx.tp_rank}
        self.bases = {REPLICATED: mix(self.seed, 1, ctx.pp_rank, ctx.dp_rank),
                      TP_LOCAL: mix(self.seed, 2, ctx.pp_rank, ctx.dp_rank, ctx.tp_rank)}
        self.step, self.calls = 0, {}  # calls: chunk id -> forwards of that chunk in this step

    def start_step(self, step: int) -> None:
        self.step, self.calls = int(step), {}

    def next_key(self, chunk: int = 0) -> DropoutKey:
        """The key for the next forward of `chunk` (the model chunk's id); recomputes reuse it."""
        n = self.calls.get(chunk, 0)
        self.calls[chunk] = n + 1
        call = mix(self.step, chunk, n)
        return DropoutKey(mix(self.bases[REPLICATED], call), mix(self.bases[TP_LOCAL], call))

    def __repr__(self) -> str:
        return (f"ParallelRNG(seed={self.seed}, coords={self.coords}, step={self.step}, "
                f"calls={self.calls})")
