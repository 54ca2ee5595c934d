"""Peak memory by category, followed at the dispatcher, for any code and any tensor kind.

`MemoryTracker` is a TorchDispatchMode: every operator's outputs pass through it, so it sees each
storage the moment it is created, and a weak reference tells it the moment the storage is freed.
Under FakeTensorMode nothing is allocated, yet the storages still carry their sizes, so the peak of
a step that would need terabytes is measured on a laptop. (torch.distributed._tools.MemTracker
works the same way but labels by module hooks, which refuse a module that runs twice in one
tracking context: every micro-batch does.)

Bytes are the storages' own sizes (numel x element size): what torch.cuda.memory_allocated counts
before the caching allocator rounds each block up to 512 bytes. Each storage gets one label,
decided by its whole life once the tracking ends:

    parameters   the storages of the parameters given to the tracker
    optimizer    the optimizer's state (and any parameters of its own, e.g. float32 main
                 weights), or a storage created inside optimizer.step() that outlives it
    gradients    a storage that was some parameter's .grad at a peak or when the optimizer
                 step began (accumulated and reduced gradients)
    activations  created in forward and still alive after that forward ends (what backward reads)
    temporaries  everything else: freed within the forward or backward that made it, comm buffers

"Forward" is anything outside autograd's backward and the optimizer step; a phase change starts a
new segment, and "outlives" means freed in a later segment or never. Peaks are kept per window:
before the optimizer step, during it and after it (see `window_peaks`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
WINDOWS = ("before optimizer", "optimizer", "after optimizer")


@dataclass
class _Storage:
    """One storage's life: bytes, the clock at birth and death, its phase and segment."""

    nbytes: int
    born: int
    phase: str
    segment: int
    fixed: str | None = None   # a label known up front (parameters, optimizer state)
    grad: bool = False         # seen as some parameter's .grad
    died: int | None = None
    died_segment: int | None = None

    def label(self) -> str:
        if self.fixed is not None:
            return self.fixed
        if self.grad:
            return "gradients"
        outlived = self.died_segment is None or self.died_segment > self.segment
        if self.phase == "optimizer" and outlived:
            return "optimizer"
        if self.phase == "forward" and outlived:
            return "activations"
        return "temporaries"

    def alive_at(self, clock: int) -> bool:
        return self.born <= clock and (self.died is None or self.died > clock)


class MemoryTracker(TorchDispatchMode):
    """Live bytes, their peaks and the breakdown by category at any moment (module docstring).

    Usage:  with MemoryTracker() as mem: model, opt = build(); mem.watch(params, opt); step()
            mem.peak, mem.window_peaks, mem.breakdown(mem.peak_clock), mem.breakdown()
    Entered before the model is built, it sees every storage the run makes; `watch` names the
    parameters and the optimizer (its step hooks mark the optimizer phase and move the window)
    and starts the peaks afresh. Storages that existed before entry are counted only if they
    are parameters or optimizer state given to `watch`.
    """

    def __init__(self):
        super().__init__()
        self.params, self.optimizer = [], None
        self.clock = self.live = self.segment = 0
        self.phase, self.window = "forward", WINDOWS[0]
        self.window_peaks: dict[str, tuple[int, int]] = {}   # window -> (bytes, clock)
        self._records: list[_Storage] = []
        self._by_id: dict[int, _Storage] = {}   # live storages by id(UntypedStorage)
        self._hooks = []

    # ------------------------------------------------------------ entry / exit
    def watch(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
              gradients: list[torch.Tensor] = ()) -> None:
        """Label the parameters, the optimizer's state and any gradient buffers kept between
        steps (e.g. float32 accumulation buffers), hook the optimizer's step, start the peaks
        anew."""
        self.params, self.optimizer = list(params), optimizer
        for g in gradients:
            self._track(g, fixed="gradients")
        owned = {id(p) for p in self.params}
        for p in self.params:
            self._track(p, fixed="parameters")
        for p in self._optimizer_params():
            if id(p) not in owned:
                self._track(p, fixed="optimizer")
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            for t in tree_leaves(state):
                if isinstance(t, torch.Tensor):
                    self._track(t, fixed="optimizer")
        self.window_peaks.clear()
        self._new_peak()
        if self.optimizer is not None:
            self._hooks = [self.optimizer.register_step_pre_hook(self._optimizer_begins),
                           self.optimizer.register_step_post_hook(self._optimizer_ends)]

    def __enter__(self):
        self._new_peak()
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _optimizer_params(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_begins(self, *_) -> None:
        self.phase, self.window, self.segment = "optimizer", WINDOWS[1], self.segment + 1
        self._new_peak()

    def _optimizer_ends(self, *_) -> None:
        self.phase, self.window, self.segment = "forward", WINDOWS[2], self.segment + 1
        self._new_peak()

    # ------------------------------------------------------------ following storages
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.after_op(out)
        return out

    def after_op(self, out) -> None:
        """Count the new storages among an op's outputs, then update the peak."""
        if self.phase != "optimizer":
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            if phase != self.phase:
                self.phase, self.segment = phase, self.segment + 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if self.live > self.window_peaks[self.window][0]:
            self._new_peak()

    def _track(self, t: torch.Tensor, fixed: str | None = None) -> None:
        st = t.untyped_storage()
        rec = self._by_id.get(id(st))
        if rec is not None:
            if fixed is not None:
                rec.fixed = fixed
            return
        self.clock += 1  # one tick per birth and per death: "alive at the peak" is exact
        rec = _Storage(st.nbytes(), self.clock, self.phase, self.segment, fixed)
        self._records.append(rec)
        self._by_id[id(st)] = rec
        self.live += rec.nbytes
        weakref.finalize(st, self._freed, id(st), rec)

    def _freed(self, key: int, rec: _Storage) -> None:
        self.clock += 1
        rec.died, rec.died_segment = self.clock, self.segment
        self.live -= rec.nbytes
        if self._by_id.get(key) is rec:
            del self._by_id[key]

    def _new_peak(self) -> None:
        """Record the live bytes as the window's peak and label the gradients alive now."""
        self.window_peaks[self.window] = (self.live, self.clock)
        self._mark_grads()

    def _mark_grads(self) -> None:
        for p in self.params + self._optimizer_params():
            if p.grad is not None:
                rec = self._by_id.get(id(p.grad.untyped_storage()))
                if rec is not None and rec.fixed is None:
                    rec.grad = True

    # ------------------------------------------------------------ results
    @property
    def peak(self) -> int:
        return max(b for b, _ in self.window_peaks.values())

    @property
    def peak_clock(self) -> int:
        return max(self.window_peaks.values())[1]

    def breakdown(self, clock: int | None = None) -> dict[str, int]:
        """Bytes by category alive at `clock` (default: now); they sum to the live total then."""
        if clock is None:
            self._mark_grads()
        when = self.clock if clock is None else clock
        out = dict.fromkeys(CATEGORIES, 0)
        for rec in self._records:
            if rec.alive_at(when):
                out[rec.label()] += rec.nbytes
        return out

    def created_in_optimizer_and_kept(self) -> int:
        """Bytes the optimizer step created that are still alive: the state a first step adds."""
        return sum(r.nbytes for r in self._records
                   if r.phase == "optimizer" and r.died is None and r.label() == "optimizer")
