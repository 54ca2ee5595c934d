"""ParallelContext: the one object that knows the process layout and owns every process group.

Layout (tp innermost so a tensor-parallel group stays inside a node, pp outermost):

    rank    = pp_rank * (dp * tp) + dp_rank * tp + tp_rank          (rank_of)
    expert domain index  i = dp_rank                 (experts replicated over tp, the default)
                         i = dp_rank * tp + tp_rank  (expert folding: experts cut over tp x dp)
    ep_rank = i % ep,  edp_rank = i // ep

so the ep ranks of one expert group are consecutive data-parallel ranks (or consecutive ranks of
one pipeline stage when folded, which keeps a small ep group inside a node). Groups:

    tp_group   : same (pp, dp)              varying tp_rank   -> tensor-parallel collectives
    dp_group   : same (pp, tp)              varying dp_rank   -> dense-gradient reduction
    pp_group   : same (dp, tp)              varying pp_rank   -> stage-to-stage send/recv
    ep_group   : same (pp, [tp,] edp)       varying ep_rank   -> expert all-to-all
    edp_group  : same (pp, [tp,] ep_rank)   varying edp_rank  -> expert-gradient reduction
    tied_group : same (dp, tp), pp in {0, pp-1}               -> tied-embedding gradients (pp > 1)
    world_group: every rank                                  -> run-wide agreement (stop, errors)
([tp,] only without folding.) A single-process run is the degenerate context (every size 1, every
group None) and goes through the same model code; collectives skip a None group. With
world_size > 1 every group exists, even of size 1, so a None group can never silently mean "the
whole world". Every process group of a run is created here, in one order on every rank.
"""
import os
import re
import shutil
import subprocess
from datetime import timedelta
from typing import Mapping, NamedTuple

import torch
import torch.distributed as dist

GROUP_KINDS = ("tp", "dp", "pp", "ep", "edp")


class RankCoords(NamedTuple):
    """Coordinates of one global rank; the expert domain index (dp, or dp * tp + tp when experts
    are folded) == edp * ep_size + ep."""

    rank: int
    pp: int
    dp: int
    tp: int
    ep: int
    edp: int


class LaunchInfo(NamedTuple):
    """Where this process sits, as told by the launcher (torchrun or SLURM)."""

    world_size: int
    rank: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    via: str  # "torchrun" | "slurm" | "none"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_divisible(what: str, value: int, by_what: str, by: int) -> None:
    """Raise a one-line ValueError unless `by` divides `value`, listing the divisors that would work.

    Example: check_divisible("n_heads", 6, "parallel.tp", 4) raises
    "n_heads (6) must be divisible by parallel.tp (4): use tp in {1, 2, 3, 6}".
    """
    if by < 1:
        raise ValueError(f"{by_what} ({by}) must be >= 1")
    if value < 1:
        raise ValueError(f"{what} ({value}) must be >= 1")
    if value % by:
        short = by_what.rsplit(".", 1)[-1]
        options = ", ".join(str(d) for d in _divisors(value))
        raise ValueError(f"{what} ({value}) must be divisible by {by_what} ({by}): use {short} in {{{options}}}")


def expert_dp_size(tp: int, dp: int, ep: int, fold: bool) -> int:
    """edp: the copies of each expert shard, the expert domain (dp ranks, or tp x dp folded) / ep."""
    return dp * (tp if fold else 1) // ep


def resolve_sizes(world_size: int, tp: int, pp: int, dp: int, ep: int, fold: bool = False) -> int:
    """Validate the degrees against world_size and return dp (dp=0 means world // (tp * pp)).
    fold: experts are cut over the tp x dp ranks of a stage instead of over dp alone."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if value < 1:
            raise ValueError(f"parallel.{name} ({value}) must be >= 1")
    if dp < 0:
        raise ValueError(f"parallel.dp ({dp}) must be >= 1, or 0 to use world_size // (tp * pp)")
    if dp == 0:
        if world_size % (tp * pp):
            raise ValueError(
                f"world_size ({world_size}) must be divisible by parallel.tp ({tp}) * parallel.pp ({pp}) "
                f"= {tp * pp}: choose tp * pp in {set(_divisors(world_size))}")
        dp = world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ValueError(
            f"parallel.tp ({tp}) * parallel.pp ({pp}) * parallel.dp ({dp}) = {tp * pp * dp} must equal "
            f"world_size ({world_size}): set dp=0 to derive it, or change the degrees")
    if fold and (tp * dp) % ep:
        raise ValueError(
            f"parallel.tp ({tp}) * parallel.dp ({dp}) = {tp * dp} must be divisible by parallel.ep ({ep}) "
            f"(folded experts shard the tp x dp ranks of a stage): use ep in "
            f"{{{', '.join(map(str, _divisors(tp * dp)))}}}")
    if not fold and dp % ep:
        raise ValueError(
            f"parallel.dp ({dp}) must be divisible by parallel.ep ({ep}) (experts shard the data-parallel "
            f"ranks): use ep in {{{', '.join(map(str, _divisors(dp)))}}}, or parallel.fold_experts=true "
            f"to shard them over tp x dp")
    return dp


def rank_of(pp_rank: int, dp_rank: int, tp_rank: int, dp: int, tp: int) -> int:
    """The global rank at these coordinates: tp innermost, then dp, pp outermost."""
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def rank_grid(world_size: int, tp: int, pp: int, dp: int, ep: int, fold: bool = False) -> list[RankCoords]:
    """Coordinates of every global rank, index = rank (pure: no processes; dp=0 derives dp)."""
    dp = resolve_sizes(world_size, tp, pp, dp, ep, fold)
    grid = []
    for rank in range(world_size):
        tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        i = dp_rank * tp + tp_rank if fold else dp_rank  # index in the expert domain
        grid.append(RankCoords(rank, pp_rank, dp_rank, tp_rank, i % ep, i // ep))
    return grid


def _fixed_coords(fold: bool) -> dict[str, tuple[str, ...]]:
    """The coordinates that stay fixed inside each kind of group (the others vary)."""
    own_tp = () if fold else ("tp",)
    return {"tp": ("pp", "dp"), "dp": ("pp", "tp"), "pp": ("dp", "tp"),
            "ep": ("pp", *own_tp, "edp"), "edp": ("pp", *own_tp, "ep")}


def group_ranks(world_size: int, tp: int, pp: int, dp: int, ep: int,
                fold: bool = False) -> dict[str, list[list[int]]]:
    """Every group of each kind as ascending global-rank lists (index in list = rank in group),
    plus "tied": the {first, last} pipeline ranks of each (dp, tp) coordinate when pp > 1.

    The order is deterministic, so all processes can create the groups in the same sequence, which
    `torch.distributed.new_group` requires.
    """
    grid = rank_grid(world_size, tp, pp, dp, ep, fold)
    groups = {}
    for kind, fixed in _fixed_coords(fold).items():
        by_key: dict[tuple, list[int]] = {}
        for c in grid:
            by_key.setdefault(tuple(getattr(c, f) for f in fixed), []).append(c.rank)
        groups[kind] = list(by_key.values())
    groups["tied"] = [[g[0], g[-1]] for g in groups["pp"]] if pp > 1 else []
    return groups


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: "node[01-03,7],gpu-a" -> [node01, node02, node03, node7, gpu-a].

    Handles zero padding and several bracket groups per name ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"SLURM nodelist {nodelist!r} has an unmatched ']'")
        if ch == "," and depth == 0:
            if nodelist[start:i]:
                hosts.extend(_expand_term(nodelist[start:i]))
            start = i + 1
    if depth:
        raise ValueError(f"SLURM nodelist {nodelist!r} has an unmatched '['")
    return hosts


def _expand_term(term: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", term)
    if match is None:
        return [term]
    head, tail = term[:match.start()], term[match.end():]
    names = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"SLURM nodelist term {term!r} has a bad range {part!r}: expected N or N-M")
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{n:0{len(lo)}d}")
    return [name + rest for name in names for rest in _expand_term(tail)]


def _slurm_first_host(nodelist: str) -> str:
    """First host of the allocation: `scontrol show hostnames` when present, else our parser."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def launch_info(env: Mapping[str, str]) -> LaunchInfo:
    """Read world/rank/local_rank and the rendezvous address from torchrun's or SLURM's variables."""
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in env]
        if missing:
            raise ValueError(f"torchrun environment is incomplete: {missing} unset; launch with torchrun")
        port = env.get("MASTER_PORT")
        return LaunchInfo(int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"]),
                          env.get("MASTER_ADDR"), int(port) if port else None, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR")
        if addr is None and env.get("SLURM_JOB_NODELIST"):
            addr = _slurm_first_host(env["SLURM_JOB_NODELIST"])
        port = env.get("MASTER_PORT")
        if port is None:
            port = 29500 + int(env["SLURM_JOB_ID"]) % 1000 if env.get("SLURM_JOB_ID", "").isdigit() else 29500
        return LaunchInfo(int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]),
                          int(env.get("SLURM_LOCALID", 0)), addr or "127.0.0.1", int(port), "slurm")
    return LaunchInfo(1, 0, 0, None, None, "none")


class ParallelContext:
    """Sizes, this rank's coordinates and its process groups; passed explicitly to whatever needs them.

    Build it with `single()`, `from_env()` (launched runs) or `for_testing()` (the process group is
    already up). Sizes: tp, pp, dp, ep, vpp (virtual stages per pipeline rank), edp = dp // ep.
    `sequence_parallel` is stored as requested-and-tp>1: with tp=1 there is nothing to shard and the
    computation is identical, so (as in Megatron) it is ignored rather than rejected.
    """

    def __init__(self, *, world_size: int, rank: int, local_rank: int = 0, tp: int = 1, pp: int = 1,
                 dp: int = 0, ep: int = 1, vpp: int = 1, sequence_parallel: bool = False,
                 fold_experts: bool = False, backend: str = "gloo", device: str | torch.device = "cpu",
                 timeout_s: float = 600):
        _validate_layout(world_size, rank, vpp, pp, backend)
        self.dp = resolve_sizes(world_size, tp, pp, dp, ep, fold_experts)
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.tp, self.pp, self.ep, self.vpp = tp, pp, ep, vpp
        self.fold_experts = bool(fold_experts)
        self.edp = expert_dp_size(tp, self.dp, ep, self.fold_experts)
        self.sequence_parallel = bool(sequence_parallel) and tp > 1
        self.backend, self.device = backend, torch.device(device)
        c = rank_grid(world_size, tp, pp, self.dp, ep, self.fold_experts)[rank]
        self.tp_rank, self.dp_rank, self.pp_rank, self.ep_rank, self.edp_rank = c.tp, c.dp, c.pp, c.ep, c.edp
        self.pp_ranks = [rank_of(p, c.dp, c.tp, self.dp, tp) for p in range(pp)]
        self.tp_group = self.dp_group = self.pp_group = self.ep_group = self.edp_group = None
        self.tied_group = self.world_group = None
        if world_size > 1:
            self._create_groups(timedelta(seconds=timeout_s))

    def _create_groups(self, timeout: timedelta) -> None:
        """Create every group on every rank, in the same order (new_group is collective), keep ours."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelContext with world_size > 1 needs torch.distributed initialised: "
                               "use ParallelContext.from_env() or call init_process_group first")
        if (dist.get_world_size(), dist.get_rank()) != (self.world_size, self.rank):
            raise ValueError(f"ParallelContext(world_size={self.world_size}, rank={self.rank}) disagrees with "
                             f"the process group (world {dist.get_world_size()}, rank {dist.get_rank()})")
        self.world_group = dist.group.WORLD
        layout = group_ranks(self.world_size, self.tp, self.pp, self.dp, self.ep, self.fold_experts)
        for kind, all_ranks in layout.items():
            for ranks in all_ranks:
                group = dist.new_group(ranks, timeout=timeout, group_desc=f"{kind}_group")
                if self.rank in ranks:
                    setattr(self, f"{kind}_group", group)

    def size(self, kind: str) -> int:
        """Size of a kind of group ("tp", "dp", "pp", "ep", "edp", "world")."""
        return {"tp": self.tp, "dp": self.dp, "pp": self.pp, "ep": self.ep, "edp": self.edp,
                "world": self.world_size}[kind]

    def group(self, kind: str):
        """This rank's group of that kind, or None when it has size 1 (nothing to communicate)."""
        return getattr(self, f"{kind}_group") if self.size(kind) > 1 else None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelContext":
        """One process, every size 1, no process group: the plain-model path."""
        return cls(world_size=1, rank=0, device=device)

    @classmethod
    def from_env(cls, tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 0, vpp: int = 1,
                 sequence_parallel: bool = False, fold_experts: bool = False, backend: str | None = None,
                 timeout_s: float = 600, device: str | torch.device | None = None) -> "ParallelContext":
        """Read the launch from torchrun or SLURM variables, validate, init the process group, build groups.

        Validation runs BEFORE init_process_group so a bad layout fails fast on every rank instead of
        hanging in the rendezvous. backend None = nccl when CUDA is available, else gloo.
        """
        info = launch_info(os.environ)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        _validate_layout(info.world_size, info.rank, vpp, pp, backend)
        resolve_sizes(info.world_size, tp, pp, dp, ep, fold_experts)
        if device is None:
            device = f"cuda:{info.local_rank}" if backend == "nccl" else "cpu"
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        if info.world_size > 1 and not dist.is_initialized():
            _init_process_group(info, backend, timedelta(seconds=timeout_s))
        return cls(world_size=info.world_size, rank=info.rank, local_rank=info.local_rank, tp=tp, pp=pp,
                   dp=dp, ep=ep, vpp=vpp, sequence_parallel=sequence_parallel, fold_experts=fold_experts,
                   backend=backend, device=device, timeout_s=timeout_s)

    @classmethod
    def for_testing(cls, rank: int, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 0,
                    vpp: int = 1, sequence_parallel: bool = False, fold_experts: bool = False,
                    timeout_s: float = 60) -> "ParallelContext":
        """Context over an already-initialised gloo process group (test workers), on CPU."""
        return cls(world_size=world_size, rank=rank, local_rank=rank, tp=tp, pp=pp, dp=dp, ep=ep, vpp=vpp,
                   sequence_parallel=sequence_parallel, fold_experts=fold_experts, backend="gloo",
                   device="cpu", timeout_s=timeout_s)

    def destroy(self) -> None:
        """Tear down torch.distributed (all groups with it); a no-op for a single process."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self.tp_group = self.dp_group = self.pp_group = self.ep_group = self.edp_group = None
        self.tied_group = self.world_group = None

    @property
    def coords(self) -> RankCoords:
        return RankCoords(self.rank, self.pp_rank, self.dp_rank, self.tp_rank, self.ep_rank, self.edp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def edp_enabled(self) -> bool:
        return self.edp > 1

    def __repr__(self) -> str:
        return (f"ParallelContext(rank {self.rank}/{self.world_size}, tp={self.tp} pp={self.pp} dp={self.dp} "
                f"ep={self.ep} edp={self.edp} vpp={self.vpp} sp={self.sequence_parallel} "
                f"fold={self.fold_experts}, coords "
                f"tp={self.tp_rank} dp={self.dp_rank} pp={self.pp_rank} ep={self.ep_rank} edp={self.edp_rank}, "
                f"{self.backend} on {self.device})")


def _validate_layout(world_size: int, rank: int, vpp: int, pp: int, backend: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size})): check the launcher")
    if vpp < 1:
        raise ValueError(f"parallel.vpp ({vpp}) must be >= 1 (1 = no interleaving)")
    if vpp > 1 and pp == 1:
        raise ValueError(f"parallel.vpp ({vpp}) needs parallel.pp > 1: set vpp=1 or raise pp")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend ({backend!r}) must be 'gloo' or 'nccl' (or None to pick by CUDA)")


def _init_process_group(info: LaunchInfo, backend: str, timeout: timedelta) -> None:
    """torchrun: env:// (the agent's store on MASTER_PORT), its keys under a prefix per restart
    (TORCHELASTIC_RESTART_COUNT): the agent keeps its store across `--max-restarts` restarts, and a
    restarted gloo rank reading a dead rank's address left there fails to connect or hangs.
    SLURM: explicit tcp:// rendezvous."""
    if info.via == "torchrun":
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return
    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size, timeout=timeout)
