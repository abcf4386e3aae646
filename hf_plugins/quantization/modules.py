"""The modules RoSTE puts into a Llama/Qwen2 model: fake-quantised linears with their online rotations, and an
attention that rotates Q/K (R3) and fake-quantises the K/V cache.

Both are swapped in by changing the class of the existing modules (`QuantLinear.convert`, `convert_attention`):
parameters keep their names and objects, so state dicts, checkpoints and `from_pretrained` are unchanged, and the
optimizer (created afterwards) sees the same tensors.

Row-vector convention throughout: a linear computes `y = x Wᵀ + b`, a rotation `H` acts as `x -> x H`
(`HadamardTransform`), and `H Hᵀ = I`.

- R2 (per head, size `head_dim`): the value projection's output is rotated per head, `v_h -> v_h H`, by rotating its
  weight on the output side before quantisation (`W_v,h -> Hᵀ W_v,h`, `b_v,h -> b_v,h H`), and the output projection's
  input columns of each head, `W_o,h -> W_o,h H`. Because `(a_h H)(W_o,h H)ᵀ = a_h W_o,hᵀ` the product is unchanged in
  float; both rotated weights are what gets quantised, so export can merge them exactly.
- R4 (size `intermediate_size`): the down projection's input is rotated online, `m -> m H`, and its weight
  `W_d -> W_d H`.
- R3 (per head, size `head_dim`): queries and keys are rotated after RoPE, `q -> q H`, `k -> k H` (`q kᵀ` is
  unchanged), before the key is fake-quantised.

Each rotation is a per-layer switch (`rotate`), set from the rotation config.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hadamard import HadamardTransform
from .quantizer import fake_quantize, fake_quantize_values, quantization_error
from .spec import QuantSpec


__all__ = ["QuantConfig", "QuantLinear", "RoSTEAttentionMixin", "convert_attention", "recording_quantization_errors"]


#: The flat names of `QuantConfig`'s settings (as `RoSTEConfig` and a model's `config.roste_quantization` spell them):
#: prefix -> `QuantConfig` field
_FLAT_PREFIXES = {"w": "weight", "a": "activation", "kv": "kv"}
#: Keys of `config.roste_quantization` that describe how an export stores the weights, not a quantiser
_STORAGE_KEYS = ("weight_format",)


@dataclass(frozen=True, init=False)
class QuantConfig:
    """The three fake quantisers of RoSTE: weights (per output channel), linear inputs (per token) and the K/V cache
    (per token per head).

    Built from three `QuantSpec`s, `QuantConfig(weight, activation, kv)`, or from the flat settings that `to_dict()`
    writes and a RoSTE model's `config.roste_quantization` holds: `QuantConfig(**model.config.roste_quantization)`
    (`w_bits`, `w_sym`, `w_clip_ratio`, `a_*`, `kv_*`; a setting left out keeps `QuantSpec`'s default; an export's
    `weight_format` is accepted and describes only the stored file)."""

    weight: QuantSpec = QuantSpec()
    activation: QuantSpec = QuantSpec()
    kv: QuantSpec = QuantSpec()

    def __init__(
        self,
        weight: QuantSpec | None = None,
        activation: QuantSpec | None = None,
        kv: QuantSpec | None = None,
        **settings,
    ):
        specs = {"weight": weight, "activation": activation, "kv": kv}
        for prefix, name in _FLAT_PREFIXES.items():
            flat = {
                key: settings.pop(f"{prefix}_{key}")
                for key in ("bits", "sym", "clip_ratio")
                if f"{prefix}_{key}" in settings
            }
            if flat and specs[name] is not None:
                raise TypeError(f"QuantConfig got both `{name}` and {', '.join(f'{prefix}_{k}' for k in flat)}.")
            if specs[name] is None:
                default = QuantSpec()
                specs[name] = QuantSpec(
                    flat.get("bits", default.bits),
                    flat.get("sym", default.symmetric),
                    flat.get("clip_ratio", default.clip_ratio),
                )
        unknown = sorted(set(settings) - set(_STORAGE_KEYS))
        if unknown:
            raise TypeError(
                f"QuantConfig got unexpected keyword argument(s) {', '.join(unknown)}: it takes weight, activation, kv "
                "(QuantSpec) or w_/a_/kv_ bits, sym and clip_ratio."
            )
        for name, spec in specs.items():
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"QuantConfig's `{name}` must be a QuantSpec, got {type(spec).__name__}.")
            object.__setattr__(self, name, spec)

    def to_dict(self) -> dict:
        """The flat settings (`w_bits`, `w_sym`, `w_clip_ratio`, `a_*`, `kv_*`); `QuantConfig(**d)` rebuilds it."""
        out = {}
        for prefix, name in _FLAT_PREFIXES.items():
            spec = getattr(self, name)
            out.update({f"{prefix}_bits": spec.bits, f"{prefix}_sym": spec.symmetric})
            out[f"{prefix}_clip_ratio"] = spec.clip_ratio
        return out

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(**d)


class _Accumulator:
    """Running mean of squared quantisation errors (for the rotation search)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, x: torch.Tensor, spec: QuantSpec) -> None:
        if spec.enabled:
            self.total += quantization_error(x, spec).item() * x.numel()
        self.count += x.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


# Optimizer steps taken in this process (any torch optimizer), counted by a global post-step hook. Part of the key of
# the quantised-weight cache: some optimizers (fused AdamW) update parameters without bumping their version counter.
_optimizer_steps = [0]
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


class _QuantWeightLinear(torch.autograd.Function):
    """`x @ Q(W_eff)ᵀ` with the cached quantised weight; the weight's gradient is the STE's identity mapped back
    through the (orthogonal) weight rotation: `dL/dW = rotate⁻¹(gᵀ x)`."""

    @staticmethod
    def forward(ctx, x, weight, qweight, module):
        ctx.module = module
        ctx.save_for_backward(x, qweight)
        ctx.weight_dtype = weight.dtype
        return F.linear(x, qweight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        x, qweight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output @ qweight.to(grad_output.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g = grad_output.reshape(-1, grad_output.shape[-1])
            grad_eff = g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)
            grad_weight = ctx.module.rotate_weight(grad_eff, inverse=True).to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None


class QuantLinear(nn.Linear):
    """A linear of a transformer block with weight and input fake quantisation (STE) and its online rotation.

    Made from an `nn.Linear` by `QuantLinear.convert` (same parameters). Attributes: `role` (`"q"`, `"k"`, `"v"`,
    `"o"`, `"gate"`, `"up"`, `"down"`), `weight_spec`, `input_spec`, `rotation` (a `HadamardTransform` for `v`/`o`
    (R2, size head_dim) and `down` (R4, size intermediate)), `rotate` (the switch), `weights_merged` (an exported
    model: the weight is already rotated and on the quantisation grid; only the online input rotation remains).

    The quantised (rotated) weight is computed once per optimizer step and cached: it is recomputed only after a torch
    optimizer step (counted by a global post-step hook) or an in-place change of the weight (its version counter, as
    `load_state_dict` or `copy_` make), so gradient-accumulation micro-batches, activation-checkpointing
    recomputations and evaluation all reuse it. Code that changes weights any other way (e.g. assigning `.data`
    outside an optimizer step) must call `clear_cache()`. `weight_quant_computations` counts the computations.
    """

    ROLES = ("q", "k", "v", "o", "gate", "up", "down")

    @classmethod
    def convert(
        cls,
        linear: nn.Linear,
        role: str,
        quant: QuantConfig,
        head_dim: int | None = None,
        rotation: HadamardTransform | None = None,
    ) -> QuantLinear:
        if role not in cls.ROLES:
            raise ValueError(f"unknown role {role!r}")
        if not isinstance(linear, QuantLinear):
            linear.__class__ = cls
        linear.role = role
        linear.weight_spec = quant.weight
        linear.input_spec = quant.activation
        linear.head_dim = head_dim
        linear.rotation = rotation
        linear.rotate = False
        linear.weights_merged = False
        linear.record = None
        linear._qweight_cache = None
        linear.weight_quant_computations = 0
        _ensure_step_hook()
        return linear

    def extra_repr(self):
        return (
            f"{super().extra_repr()}, role={self.role}, w_bits={self.weight_spec.bits}, "
            f"a_bits={self.input_spec.bits}, rotate={self.rotate}, merged={self.weights_merged}"
        )

    # ------------------------------------------------------------------ rotations
    @property
    def rotates_weight(self) -> bool:
        return (
            self.rotate and self.rotation is not None and not self.weights_merged and self.role in ("v", "o", "down")
        )

    @property
    def rotates_input(self) -> bool:
        return self.rotate and self.rotation is not None and self.role == "down"

    def rotate_weight(self, w: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """The weight as this layer applies it (`W_eff`), or with `inverse=True` the map back (for gradients)."""
        if not self.rotates_weight:
            return w
        if self.role == "down":
            return self.rotation(w, inverse=inverse)
        if self.role == "o":
            out = w.shape[0]
            return self.rotation(w.reshape(out, -1, self.head_dim), inverse=inverse).reshape(w.shape)
        # v: output side, per head: W_h -> Hᵀ W_h, i.e. W_hᵀ -> W_hᵀ H
        blocks = w.reshape(-1, self.head_dim, w.shape[1]).transpose(1, 2)
        return self.rotation(blocks, inverse=inverse).transpose(1, 2).reshape(w.shape)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or not (self.rotates_weight and self.role == "v"):
            return self.bias
        return self.rotation(self.bias.reshape(-1, self.head_dim)).reshape(self.bias.shape)

    # ------------------------------------------------------------------ quantised weight
    def _weight_is_plain(self) -> bool:
        return self.weights_merged or (not self.rotates_weight and not self.weight_spec.enabled)

    def quantized_weight(self) -> torch.Tensor:
        """`Q_w(W_eff)` without autograd history, from the cache when the weight has not changed."""
        if self._weight_is_plain():
            return self.weight.detach()
        w = self.weight
        key = (_optimizer_steps[0], w._version, w.data_ptr(), w.dtype, w.device, self.rotates_weight, self.weight_spec)
        if self._qweight_cache is None or self._qweight_cache[0] != key:
            with torch.no_grad():
                qweight = fake_quantize_values(self.rotate_weight(w.detach()), self.weight_spec)
            self._qweight_cache = (key, qweight)
            self.weight_quant_computations += 1
        return self._qweight_cache[1]

    def clear_cache(self) -> None:
        self._qweight_cache = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotates_input:
            x = self.rotation(x)
        if self.record is not None:
            self.record["input"].add(x, self.input_spec)
            if not self.record["weight"].count:
                w_eff = self.weight.detach() if self.weights_merged else self.rotate_weight(self.weight.detach())
                self.record["weight"].add(w_eff, self.weight_spec)
        x = fake_quantize(x, self.input_spec)
        bias = self.effective_bias()
        if self._weight_is_plain():
            return F.linear(x, self.weight, bias)
        y = _QuantWeightLinear.apply(x, self.weight, self.quantized_weight(), self)
        return y + bias if bias is not None else y


class RoSTEAttentionMixin:
    """Forward of a Llama/Qwen2 attention with R3 (Hadamard on Q and K after RoPE) and K/V fake quantisation per
    token per head, before the cache and the attention kernel. Attributes: `kv_spec`, `r3_rotation`, `rotate_r3`."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = self._roste_rope(query, key, cos, sin)
        if self.rotate_r3:
            query, key = self.r3_rotation(query), self.r3_rotation(key)
        if self.record is not None:
            self.record["k"].add(key, self.kv_spec)
            self.record["v"].add(value, self.kv_spec)
        key, value = fake_quantize(key, self.kv_spec), fake_quantize(value, self.kv_spec)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        implementation = self.config._attn_implementation
        if implementation in (None, "eager"):
            interface = self._roste_eager
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            interface = ALL_ATTENTION_FUNCTIONS[implementation]
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) is not None else {}
        output, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


_ATTENTION_CLASSES: dict[type, type] = {}


def _attention_class(cls: type) -> type:
    if issubclass(cls, RoSTEAttentionMixin):
        return cls
    if cls not in _ATTENTION_CLASSES:
        name = f"RoSTE{cls.__name__}"
        new_cls = type(name, (RoSTEAttentionMixin, cls), {"__module__": __name__})
        new_cls.__qualname__ = name
        globals()[name] = new_cls  # importable by name, so the module pickles
        _ATTENTION_CLASSES[cls] = new_cls
    return _ATTENTION_CLASSES[cls]


def convert_attention(attention: nn.Module, kv_spec: QuantSpec, r3_rotation: HadamardTransform) -> nn.Module:
    """Give a Llama/Qwen2 attention module RoSTE's forward (R3 switch off)."""
    original = attention.__class__ if not isinstance(attention, RoSTEAttentionMixin) else None
    if original is not None:
        modeling = sys.modules[original.__module__]
        attention._roste_rope = staticmethod(modeling.apply_rotary_pos_emb).__func__
        attention._roste_eager = modeling.eager_attention_forward
        attention.__class__ = _attention_class(original)
    attention.kv_spec = kv_spec
    attention.r3_rotation = r3_rotation
    attention.rotate_r3 = False
    attention.record = None
    return attention


@contextlib.contextmanager
def recording_quantization_errors(model: nn.Module):
    """While the block runs, every `QuantLinear` and RoSTE attention of `model` keeps the running mean squared
    quantisation error (`.mean`) of each tensor it fake-quantises, in `module.record`: `"input"` and `"weight"` for a
    linear (the weight once, as the first forward quantises it), `"k"` and `"v"` for an attention. The records are
    dropped when the block ends."""
    modules = [m for m in model.modules() if isinstance(m, (QuantLinear, RoSTEAttentionMixin))]
    for module in modules:
        names = ("input", "weight") if isinstance(module, QuantLinear) else ("k", "v")
        module.record = {name: _Accumulator() for name in names}
    try:
        yield
    finally:
        for module in modules:
            module.record = None
