"""HFT (Half Fine-Tuning, arXiv 2404.18466): the category-level selection of the tensors to freeze, `apply_hft`, and
`HFTCallback`, which redraws the selection per epoch.

HFT freezes about half of each decoder layer and trains the rest. The selection is made per layer and per category
(the rule of the paper's Fig. 2, "freeze half of the parameters at the category-level", as its public
reimplementation applies it):

- attention: `ratio` of {q_proj, k_proj, v_proj, o_proj} (2 of 4 at 0.5);
- feed-forward: `ratio` of {gate_proj, up_proj, down_proj}; where that is not a whole number, the fraction is
  spread over the layers (at 0.5: 2 of 3 in a random `L // 2` of the layers, 1 of 3 in the others);
- norms: `ratio` of the layer's `*layernorm` modules (1 of 2 at 0.5).

Each choice is uniformly random. The embeddings, the final norm, the lm_head and every other parameter outside the
three categories stay trainable. `balance="params"` keeps the counts but draws only among the subsets whose size in
parameters is closest to the count's share of the category: with grouped-query attention, where K and V are smaller
than Q and O, the attention pair is then always one of {Q, O} with one of {K, V}, half of the attention parameters.

With adapters (a PEFT model) the units are the adapted modules of the same categories, and a unit's tensors are its
trainable ones (the adapter weights): HFT then freezes half of the adapters by the same rule.

Freezing is `requires_grad=False`: frozen tensors get no gradient, no optimizer state and no weight decay, which is
where HFT saves time and memory, and every trainer that builds its optimizer from the trainable parameters (TRL's,
transformers', ours) works with it unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
CATEGORIES = ("attention", "feed_forward", "norm")
BALANCES = ("count", "params")
REDRAWS = ("stage", "epoch")

# `<...>.layers.<i>.<...>.<leaf>`: the first numbered component is the decoder layer (a numbered component deeper
# down, such as an expert's index, belongs to the layer)
_LAYER_NAME = re.compile(r"^(?P<layer>(?:.*?\.)?\d+)\.(?:.+\.)?(?P<leaf>[^.]+)$")


def _category(leaf: str) -> str | None:
    if leaf in ATTENTION:
        return "attention"
    if leaf in FEED_FORWARD:
        return "feed_forward"
    if leaf.endswith("layernorm"):
        return "norm"
    return None


def check_hft_settings(ratio: float, balance: str, redraw: str = "stage", prefix: str = "") -> None:
    """One-line `ValueError`s for bad settings; `prefix` is the field names' prefix (`hft_` in a config)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(
            f"`{prefix}ratio={ratio!r}`: HFT freezes this fraction of each category, which must be in (0, 1); the "
            "paper's value is 0.5."
        )
    if balance not in BALANCES:
        raise ValueError(f"`{prefix}balance={balance!r}`: must be one of {', '.join(map(repr, BALANCES))}.")
    if redraw not in REDRAWS:
        raise ValueError(f"`{prefix}redraw={redraw!r}`: must be one of {', '.join(map(repr, REDRAWS))}.")


@dataclass(frozen=True)
class HFTUnit:
    """One module that HFT freezes or trains as a whole: its name, category, decoder layer and tensors."""

    module: str
    category: str
    layer: str
    parameters: tuple[str, ...]
    numel: int


@dataclass
class HFTSelection:
    """One draw of the selection.

    Attributes:
        draw (`int`): the draw's index (0: the first; with `redraw="epoch"`, the epoch).
        frozen_modules (`tuple[str, ...]`): the frozen units' module names.
        frozen (`tuple[str, ...]`): the frozen parameters' names (as `model.named_parameters()` gives them).
        trainable (`tuple[str, ...]`): the parameters of the units left trainable.
        frozen_numel, managed_numel (`int`): the parameters frozen, and those of all units.
        per_layer (`dict`): layer -> category -> the leaf names of its frozen units, e.g. `{"model.layers.0":
            {"attention": ["k_proj", "q_proj"], ...}}`.
    """

    draw: int
    frozen_modules: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen_numel: int
    managed_numel: int
    per_layer: dict = field(default_factory=dict)

    @property
    def frozen_fraction(self) -> float:
        """The frozen share of the parameters HFT selects among (embeddings, final norm and lm_head excluded)."""
        return self.frozen_numel / self.managed_numel


def _draw_generator(seed: int, draw: int) -> torch.Generator:
    # Each draw has its own stream, a function of (seed, draw) alone: a resumed run redraws exactly what the
    # uninterrupted run drew, whatever happened before
    digest = hashlib.sha256(f"hft:{seed}:{draw}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _has_adapters(model) -> bool:
    return hasattr(model, "peft_config")


class HFTSelector:
    """The units of a model and the draws of HFT's selection among them. Built once per model: the units' tensors
    are the ones trainable when it is built (all of a full model; the adapter weights of a PEFT model), so later
    draws can unfreeze what an earlier one froze.

    Args:
        model: the model, after any PEFT wrapping.
        ratio (`float`): the fraction of each category to freeze, in (0, 1).
        balance (`str`): `"count"` (uniform among the subsets of the category's count) or `"params"` (among those
            closest in parameters to the count's share).
        seed (`int`): the seed of the draws.
    """

    def __init__(self, model, ratio: float = 0.5, balance: str = "count", seed: int = 0):
        check_hft_settings(ratio, balance)
        self.model, self.ratio, self.balance, self.seed = model, float(ratio), balance, int(seed)
        self.layers = self._find_units(model)
        self.units = [unit for layer in self.layers.values() for units in layer.values() for unit in units]
        self.managed = tuple(name for unit in self.units for name in unit.parameters)
        self.selection: HFTSelection | None = None

    @property
    def settings(self) -> dict:
        return {"ratio": self.ratio, "balance": self.balance, "seed": self.seed}

    # ------------------------------------------------------------------ units
    @staticmethod
    def _find_units(model) -> dict[str, dict[str, list[HFTUnit]]]:
        adapters = _has_adapters(model)
        layers: dict[str, dict[str, list[HFTUnit]]] = {}
        linear_leaves: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            match = _LAYER_NAME.match(name)
            if not match:
                continue
            layer, leaf = match["layer"], match["leaf"]
            if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Conv1D"):
                linear_leaves.setdefault(layer, []).append(name[len(layer) + 1 :])
            category = _category(leaf)
            if category is None:
                continue
            parameters = [(f"{name}.{p_name}", p) for p_name, p in module.named_parameters() if p.requires_grad]
            slots = layers.setdefault(layer, {c: [] for c in CATEGORIES})
            if parameters:
                numel = sum(p.numel() for _, p in parameters)
                slots[category].append(HFTUnit(name, category, layer, tuple(n for n, _ in parameters), numel))
            elif not adapters:
                slots[category].append(None)  # present but already frozen: counted for the check, never drawn
        if not adapters:
            HFTSelector._check_full_model(model, layers, linear_leaves)
        for slots in layers.values():
            for category in CATEGORIES:
                slots[category] = [unit for unit in slots[category] if unit is not None]
        layers = {layer: slots for layer, slots in layers.items() if any(slots.values())}
        if not layers:
            where = "adapter modules" if adapters else "modules"
            raise ValueError(
                f"HFT found no trainable {where} named {', '.join(ATTENTION + FEED_FORWARD)} or *layernorm in the "
                "decoder layers"
                + (
                    ": put the adapters on those modules (e.g. LoRA `target_modules='all-linear'`)."
                    if adapters
                    else "."
                )
            )
        return layers

    @staticmethod
    def _check_full_model(model, layers, linear_leaves) -> None:
        if not layers:
            leaves = sorted({leaf for names in linear_leaves.values() for leaf in names})
            raise ValueError(
                f"HFT found no decoder layer with {'/'.join(ATTENTION)} and {'/'.join(FEED_FORWARD)} modules in "
                f"{type(model).__name__}"
                + (f" (its layers' linear modules: {', '.join(leaves[:8])})" if leaves else "")
                + ": the category rule needs separate Q/K/V/O and gate/up/down projections (Llama, Mistral, Qwen2, "
                "Gemma style); fused projections (GPT-2's c_attn, Phi-3's qkv_proj, fused experts) are not supported."
            )
        for layer, slots in layers.items():
            leaves = {name.rsplit(".", 1)[-1] for name in linear_leaves.get(layer, [])}
            missing = [leaf for leaf in ATTENTION + FEED_FORWARD if leaf not in leaves]
            counts = (len(slots["attention"]), len(slots["feed_forward"]))
            if missing:
                what = f"no {', '.join(missing)}"
            elif counts != (len(ATTENTION), len(FEED_FORWARD)):
                what = f"{counts[0]} attention and {counts[1]} feed-forward projections"
            elif not slots["norm"]:
                what = "no *layernorm module"
            else:
                continue
            raise ValueError(
                f"HFT: decoder layer {layer} of {type(model).__name__} has {what}; the category rule needs one each "
                f"of {', '.join(ATTENTION + FEED_FORWARD)} and the layer's *layernorm modules (fused projections and "
                "mixtures of experts are not supported)."
            )

    # ------------------------------------------------------------------ draws
    def _per_layer_counts(self, generator, sizes: list[int]) -> list[int]:
        """How many units of one category each layer freezes: `floor(ratio * n)`, plus one in a random
        `floor(sum of the fractions)` of the layers whose share is not whole (at 0.5 with 3 units: `L // 2` layers
        freeze 2, the others 1)."""
        exact = [self.ratio * n for n in sizes]
        counts = [math.floor(x + 1e-9) for x in exact]
        fractional = [i for i, (x, c) in enumerate(zip(exact, counts)) if x - c > 1e-9]
        extra = math.floor(sum(exact[i] - counts[i] for i in fractional) + 1e-9)
        if fractional and extra:
            order = torch.randperm(len(fractional), generator=generator).tolist()
            for position in order[:extra]:
                counts[fractional[position]] += 1
        return counts

    def _choose(self, generator, units: list[HFTUnit], count: int) -> list[HFTUnit]:
        if count == 0:
            return []
        if self.balance == "count":
            return [units[i] for i in torch.randperm(len(units), generator=generator)[:count].tolist()]
        target = count / len(units) * sum(unit.numel for unit in units)
        subsets = list(itertools.combinations(range(len(units)), count))
        distance = [abs(sum(units[i].numel for i in subset) - target) for subset in subsets]
        best = [subset for subset, d in zip(subsets, distance) if d == min(distance)]
        chosen = best[int(torch.randint(len(best), (1,), generator=generator))]
        return [units[i] for i in chosen]

    def draw(self, index: int = 0) -> HFTSelection:
        """The selection of draw `index` (a function of the seed and the index alone)."""
        generator = _draw_generator(self.seed, index)
        frozen_units: list[HFTUnit] = []
        per_layer = {layer: {c: [] for c in CATEGORIES} for layer in self.layers}
        for category in CATEGORIES:
            names = [layer for layer, slots in self.layers.items() if slots[category]]
            counts = self._per_layer_counts(generator, [len(self.layers[layer][category]) for layer in names])
            for layer, count in zip(names, counts):
                chosen = self._choose(generator, self.layers[layer][category], count)
                frozen_units += chosen
                per_layer[layer][category] = sorted(unit.module.rsplit(".", 1)[1] for unit in chosen)
        frozen = {name for unit in frozen_units for name in unit.parameters}
        return HFTSelection(
            draw=index,
            frozen_modules=tuple(sorted(unit.module for unit in frozen_units)),
            frozen=tuple(name for name in self.managed if name in frozen),
            trainable=tuple(name for name in self.managed if name not in frozen),
            frozen_numel=sum(unit.numel for unit in frozen_units),
            managed_numel=sum(unit.numel for unit in self.units),
            per_layer=per_layer,
        )

    def with_settings(self, ratio: float, balance: str, seed: int) -> HFTSelector:
        """A selector over the same units with other settings (a model selected again, e.g. for the next stage)."""
        check_hft_settings(ratio, balance)
        other = copy.copy(self)
        other.ratio, other.balance, other.seed, other.selection = float(ratio), balance, int(seed), None
        return other

    def managed_parameters(self) -> dict[str, torch.nn.Parameter]:
        parameters = dict(self.model.named_parameters())
        return {name: parameters[name] for name in self.managed}

    def apply(self, selection: HFTSelection) -> set[str]:
        """Freeze `selection.frozen` and unfreeze the rest of the units; returns the names whose status changed."""
        frozen = set(selection.frozen)
        changed = set()
        for name, parameter in self.managed_parameters().items():
            trainable = name not in frozen
            if parameter.requires_grad != trainable:
                changed.add(name)
            parameter.requires_grad_(trainable)
            if not trainable:
                parameter.grad = None
        self.selection = selection
        return changed

    def unfreeze_all(self) -> None:
        for parameter in self.managed_parameters().values():
            parameter.requires_grad_(True)


def apply_hft(model, ratio: float = 0.5, seed: int = 0, balance: str = "count") -> HFTSelection:
    """Freeze HFT's half of `model` in place, before the trainer is built: every trainer then trains the other half.

    Args:
        model: a causal LM with Llama-style modules (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
            `down_proj`, `*layernorm`), or a PEFT model (then half of its adapter modules are frozen by the same
            rule).
        ratio (`float`, *optional*, defaults to `0.5`): the fraction of each category to freeze, in (0, 1).
        seed (`int`, *optional*, defaults to `0`): the seed of the draw; use a new one per training stage, as the
            paper does.
        balance (`str`, *optional*, defaults to `"count"`): `"count"` (the paper's rule, uniform among the subsets
            of each category's count) or `"params"` (among those closest in parameters to half: with grouped-query
            attention one of Q/O and one of K/V).

    Returns:
        [`HFTSelection`]: the frozen set (also kept in `model.hft_selector.selection`).
    """
    settings = {"ratio": float(ratio), "balance": balance, "seed": int(seed)}
    selector = getattr(model, "hft_selector", None)
    if selector is None or selector.model is not model:  # (a PEFT model forwards the attribute of its base)
        selector = HFTSelector(model, **settings)
    elif selector.settings != settings:
        selector = selector.with_settings(**settings)
    # a plain attribute (not a submodule): a trainer given the model finds its selection there
    model.hft_selector = selector
    selector.apply(selector.draw(0))
    return selector.selection


def check_hft_architecture(config) -> None:
    """Refuse, before any weight loads, a model whose decoder layers HFT cannot select in (a `ValueError`, as
    `apply_hft` would raise): the model of `config` (a transformers config) is built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    HFTSelector._find_units(model)


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def reset_optimizer_state(optimizer, parameters) -> int:
    """Drop the optimizer state (Adam's moments and step) of `parameters`; returns how many had state."""
    state = _inner_optimizer(optimizer).state
    return sum(state.pop(parameter, None) is not None for parameter in parameters)


def optimizer_parameters(optimizer) -> set[int]:
    return {id(p) for group in _inner_optimizer(optimizer).param_groups for p in group["params"]}


def check_redraw_possible(
    args, redraw: str, count_processes: bool = True, fsdp: bool = False, deepspeed: bool = False
) -> None:
    """`redraw="epoch"` changes which tensors are trained mid-run: a sharded engine (FSDP, DeepSpeed) has flattened
    the parameters and their optimizer state, and DDP has fixed the tensors it reduces, when training starts."""
    if redraw == "stage":
        return
    engine = "FSDP" if fsdp or getattr(args, "fsdp", None) else None
    engine = engine or ("DeepSpeed" if deepspeed or getattr(args, "deepspeed", None) else None)
    # a config's `world_size` sets up the devices: its `__post_init__` checks the engines only
    if engine is None and count_processes and args.world_size > 1:
        engine = f"{args.world_size} processes (DDP)"
    if engine:
        raise ValueError(
            f"`hft_redraw='epoch'` cannot run under {engine}: the engine fixes the trained tensors and their optimizer "
            "state when training starts. Set `hft_redraw='stage'` (one draw per run; a new `hft_seed` per stage)."
        )


class HFTCallback(TrainerCallback):
    """Keeps HFT's selection during training and, with `redraw="epoch"`, draws a new one at the start of every epoch
    after the first: tensors that change status lose their optimizer state (a newly frozen tensor keeps none, a
    newly trained one starts fresh instead of from stale moments), tensors that stay trainable keep theirs.

    The draw of epoch `e` is a function of `(seed, e)` alone, so a resumed run draws what the uninterrupted run drew.
    Redrawing needs an optimizer that holds every tensor HFT may unfreeze (frozen ones have no gradient, so it keeps
    no state for them and does not decay them): `with_hft(TrainerClass)` builds it so. One process, no FSDP or
    DeepSpeed (refused at the start of training).

    Args:
        selector ([`HFTSelector`]): the model's selector (`model.hft_selector` after [`apply_hft`]).
        redraw (`str`, *optional*, defaults to `"stage"`): `"stage"` (one draw for the run) or `"epoch"`.
    """

    def __init__(self, selector: HFTSelector, redraw: str = "stage"):
        check_hft_settings(selector.ratio, selector.balance, redraw)
        self.selector, self.redraw = selector, redraw
        self.resets: list[tuple[int, int]] = []  # (epoch, tensors whose optimizer state was dropped)

    @staticmethod
    def _epoch_entered(state) -> int:
        # `state.epoch` is a whole number at an epoch's end (and in a checkpoint saved there), fractional inside one
        return int(math.floor((state.epoch or 0.0) + 1e-9))

    @staticmethod
    def _epoch_of_last_step(state) -> int:
        return max(0, math.ceil((state.epoch or 0.0) - 1e-9) - 1)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.redraw == "stage":
            return
        check_redraw_possible(args, self.redraw)
        held = optimizer_parameters(optimizer) if optimizer is not None else set()
        missing = [name for name, p in self.selector.managed_parameters().items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"HFTCallback(redraw='epoch'): the optimizer does not hold {missing[0]} (and {len(missing) - 1} more "
                "tensors HFT may unfreeze): build the trainer with `with_hft(TrainerClass)` and its `hft_*` fields, "
                "whose optimizer holds every tensor of the selection."
            )
        # A resumed run continues with the selection its checkpoint trained with (its optimizer state matches it)
        self.selector.apply(self.selector.draw(self._epoch_of_last_step(state)))

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.redraw != "epoch":
            return
        epoch = self._epoch_entered(state)
        if self.selector.selection is not None and self.selector.selection.draw == epoch:
            return
        changed = self.selector.apply(self.selector.draw(epoch))
        parameters = self.selector.managed_parameters()
        dropped = reset_optimizer_state(optimizer, [parameters[name] for name in changed]) if optimizer else 0
        self.resets.append((epoch, dropped))
