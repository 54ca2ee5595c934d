"""Float8 GEMMs for our tensor-parallel linears through torchao's float8 training (optional).

torchao's module swap (`convert_to_float8_training`) replaces `nn.Linear`; our linears are our own
Column/RowParallelLinear calling F.linear, plus the fused q/k/v and gate/up GEMM, so the swap never
reaches them. They call instead the autograd function torchao's own `Float8Linear.forward` calls,
`matmul_with_hp_or_float8_args(x, W^T, linear_mm_config, config)`, with the layer's recipe (a
`Float8LinearConfig` from torchao's recipe name). For y = x W^T (x [T, in], W [out, in]) it casts
each operand dynamically, scale = finfo(fp8).max / amax, and runs three float8 GEMMs:

    forward      y  = fp8(x) · fp8(W)ᵀ         x, W in e4m3
    grad input   dx = fp8(dy) · fp8(W)         dy in e5m2 (tensorwise) or e4m3 (rowwise)
    grad weight  dW = fp8(dy)ᵀ · fp8(x)

"tensorwise": one scale per tensor (cuBLAS). "rowwise": one scale per row along each GEMM's inner
dim, rounded down to a power of two (CUTLASS). Outputs and gradients come back in the operands'
high precision (bf16); weights stay bf16 parameters with float32 main copies in the optimizer.

Tensor parallelism: each rank scales what it holds (its weight shard, its input and output
gradient); no amax crosses ranks. torchao under DTensor all-reduces the amax over the tp mesh when
the scaled dim is sharded (measured: a row-parallel shard gets the whole tensor's, or the whole
row's, scale), which makes tp N compute exactly what tp 1 does but puts a blocking collective in
front of every such cast. Per-shard scales cost nothing and are never coarser (a shard's amax is at
most the tensor's), so tp N differs from tp 1 only within float8 rounding.

Not float8: the LM head (large-vocab logits are sensitive; torchtitan and Megatron keep it in
bf16), the router (float32) and the experts' grouped GEMMs (see docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import torch

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ALIGN = 16               # float8 GEMM operand dims must be multiples of 16 (torch._scaled_mm)


def _torchao() -> tuple[Any, Any, Any] | str:
    """(Float8LinearConfig, the float8 matmul autograd function, LinearMMConfig/ScaledMMConfig
    module) from the installed torchao, or the reason they do not import."""
    try:
        config = importlib.import_module("torchao.float8.config")
        linear = importlib.import_module("torchao.float8.float8_linear")
        tensor = importlib.import_module("torchao.float8.float8_training_tensor")
        return config.Float8LinearConfig, linear.matmul_with_hp_or_float8_args, tensor
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Float8Recipe:
    """What a float8 layer needs: the recipe name, torchao's per-layer config and GEMM config."""
    name: str
    emulate: bool   # float32 GEMMs on dequantized float8 operands (any device; for checks, slow)
    config: Any     # torchao Float8LinearConfig
    mm_config: Any  # torchao LinearMMConfig (one ScaledMMConfig per GEMM)
    matmul: Any     # torchao's float8 matmul autograd function


def float8_recipe(name: str, emulate: bool = False) -> Float8Recipe:
    """torchao's recipe `name` ("tensorwise" or "rowwise") for our layers."""
    if name not in RECIPES:
        raise ValueError(f"training.fp8 ({name!r}) must be off, {' or '.join(RECIPES)}")
    found = _torchao()
    if isinstance(found, str):
        raise ImportError(f"training.fp8={name} needs torchao's float8 training, which does not "
                          f"import here ({found}): pip install torchao, or set training.fp8=off")
    config_cls, matmul, tensor = found
    config = dataclasses.replace(config_cls.from_recipe_name(name), emulate=emulate)
    gemms = (config.gemm_config_output, config.gemm_config_grad_input,
             config.gemm_config_grad_weight)
    mm_config = tensor.LinearMMConfig(*(tensor.ScaledMMConfig(emulate, g.use_fast_accum, False,
                                                              config.pad_inner_dim) for g in gemms))
    return Float8Recipe(name, emulate, config, mm_config, matmul)


def check_float8_device(name: str, device: torch.device, emulate: bool) -> None:
    """Float8 GEMMs need a CUDA GPU of compute capability >= 8.9 (unless emulated)."""
    if emulate:
        return
    fix = ("set training.fp8=off, or training.fp8_emulate=true to check float8 numerics slowly "
           "without float8 hardware")
    if device.type != "cuda":
        raise ValueError(f"training.fp8={name} needs a CUDA GPU with compute capability >= 8.9 "
                         f"(Ada, Hopper or newer); this run is on {device.type}: {fix}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise ValueError(f"training.fp8={name} needs compute capability >= 8.9 (Ada, Hopper or "
                         f"newer); {torch.cuda.get_device_name(device)} has {major}.{minor}: {fix}")


def check_float8_shape(where: str, weight: torch.Tensor) -> None:
    """A float8 layer's local weight [out, in] must have both dims multiples of 16."""
    if weight.dim() != 2 or any(n % ALIGN for n in weight.shape):
        shape = tuple(weight.shape)
        raise ValueError(f"training.fp8: {where} has a local weight of shape {shape}; float8 GEMMs "
                         f"need both dims multiples of {ALIGN}: change the model sizes (or the tp "
                         f"size), or set training.fp8=off")


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The high precision of the operands: autocast's dtype when it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  recipe: Float8Recipe) -> torch.Tensor:
    """y = x W^T (+ b) with float8 GEMMs forward and backward; x [.., in], W [out, in] -> [.., out]
    in the operands' high precision (autocast's dtype under autocast)."""
    dtype = _compute_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        y = recipe.matmul.apply(x.to(dtype), weight.to(dtype).t(), recipe.mm_config, recipe.config)
    return y if bias is None else y + bias.to(y.dtype)


def float8_fused_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                        recipe: Float8Recipe) -> torch.Tensor:
    """y = x [W_1; W_2; ..]^T (+ b) as one float8 GEMM. torchao's function keeps its weight operand
    for backward; here that operand is the concatenation, so a saved-tensor hook keeps the weights
    themselves instead and concatenates them again in backward: no copy of them lives from a
    micro-batch's forward to its backward (as in parallel.tensor's bf16 fused GEMM)."""
    dtype = _compute_dtype(x, weights[0])
    parts = [w.to(dtype) for w in weights]
    w_t = torch.cat(parts).t()  # [in, sum out]
    w_id = id(w_t)  # not w_t itself: the hooks live as long as the saved tensors

    def pack(t: torch.Tensor):
        return ("concatenated weights",) if id(t) == w_id else t

    def unpack(packed):
        if isinstance(packed, tuple):
            return torch.cat([p.detach() for p in parts]).t()
        return packed

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
    with torch.autocast(x.device.type, enabled=False), hooks:
        y = recipe.matmul.apply(x.to(dtype), w_t, recipe.mm_config, recipe.config)
    return y if bias is None else y + bias.to(y.dtype)
