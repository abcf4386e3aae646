"""Model soups, LiNeS and fine-tuning transfer (`hf_plugins.merging`) against direct float64 state_dict arithmetic, on
tiny models saved in several shards, full and LoRA; their outputs loaded by `from_pretrained`; bad input refused
before anything is written; `hf-plugins merge`."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from testing_utils import F64
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

from hf_plugins import cli
from hf_plugins.callbacks import LiNeSCallback
from hf_plugins.merging import (
    Checkpoint,
    MergeError,
    gather_ingredients,
    greedy_soup,
    layer_index,
    lines_factors,
    lines_scale,
    transfer_finetuning,
    uniform_soup,
)
from hf_plugins.testing import build_tiny_model, build_tokenizer


SHARD = "30KB"  # the tiny model (~190 KB in float32) saves in about 8 shards
LORA_MODULES = ["q_proj", "v_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ fixtures
def _perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune' of `model`: every parameter moved by seeded noise (the same base, as soups require)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _save(model, tokenizer, path: Path, shard: str = SHARD) -> Path:
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return path


def _state(path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: tensor.to(F64) for name, tensor in model.state_dict().items()}


def _merged_state(base, adapter) -> dict:
    """The float64 weights of `base` with the LoRA adapter merged in (PEFT's own merge, run in float64)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(F64)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.clone() for name, tensor in merged.state_dict().items()}


def _logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.to(F64)(tokens).logits


def _assert_loads_as(path, expected: dict, base_dir, tokens):
    """The output loads with `from_pretrained` (a LoRA adapter: `PeftModel.from_pretrained` on `base_dir`), has the
    expected weights and gives the logits of a model holding them."""
    if (Path(path) / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path)
        actual = _merged_state(base_dir, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        actual = _state(path)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(F64)
    if reference.get_input_embeddings().weight.shape[0] != expected["model.embed_tokens.weight"].shape[0]:
        reference.resize_token_embeddings(expected["model.embed_tokens.weight"].shape[0])
    reference.load_state_dict(expected)
    torch.testing.assert_close(_logits_of(model, tokens), _logits_of(reference, tokens), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return tokenizer("What is two plus three? Five.", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A 3-layer base and three fine-tunes of it, saved in shards (one of them in a single file)."""
    root = tmp_path_factory.mktemp("models")
    folders = {"base": _save(build_tiny_model(tokenizer, num_layers=3), tokenizer, root / "base")}
    for seed in (1, 2, 3):
        model = _perturbed(build_tiny_model(tokenizer, num_layers=3), seed)
        folders[f"ft{seed}"] = _save(model, tokenizer, root / f"ft{seed}", shard="5GB" if seed == 3 else SHARD)
    return folders


def _adapter(base_dir, path, seed, **lora):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = dict(r=2, lora_alpha=4, target_modules=LORA_MODULES, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{**settings, **lora}))
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, models):
    """LoRA adapters of the base: different ranks, rsLoRA, a per-module rank."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        _adapter(models["base"], root / "a1", 1),
        _adapter(models["base"], root / "a2", 2, r=4, lora_alpha=8, use_rslora=True),
        _adapter(models["base"], root / "a3", 3, r=2, lora_alpha=2, rank_pattern={"down_proj": 3}),
    ]


def _no_partial_output(output: Path):
    assert not output.exists()
    assert not [path for path in output.parent.iterdir() if ".partial-" in path.name or ".greedy-soup-" in path.name]


# ------------------------------------------------------------------------------------------------ layers
def test_layer_index_parses_decoder_names_and_takes_an_override():
    assert layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_index("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None and layer_index("model.norm.weight") is None
    # the official code's ".{i}." substring match would read the expert index; the block pattern does not
    assert layer_index("model.layers.2.mlp.experts.7.down_proj.weight") == 2
    assert layer_index("transformer.h.3.attn.c_attn.weight", r"\.h\.(\d+)\.") == 3
    assert lines_factors(0.2, 0.8, 5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


# ------------------------------------------------------------------------------------------------ soups
def test_uniform_soup_is_the_float64_mean_of_sharded_checkpoints(models, tokens, tmp_path):
    paths = [models["ft1"], models["ft2"], models["ft3"]]
    assert len(Checkpoint.open(models["ft1"]).shards()) > 3
    output = uniform_soup(paths, output_dir=tmp_path / "soup", max_shard_size=SHARD, progress=False)
    states = [_state(path) for path in paths]
    expected = {name: sum(state[name] for state in states) / 3 for name in states[0]}
    assert (output / "model.safetensors.index.json").is_file() and len(Checkpoint.open(output).shards()) > 3
    assert (output / "tokenizer.json").is_file()
    _assert_loads_as(output, expected, models["base"], tokens)


def test_uniform_soup_of_tied_embeddings(tokenizer, tokens, tmp_path):
    paths = [
        _save(
            _perturbed(build_tiny_model(tokenizer, tie_word_embeddings=True), seed), tokenizer, tmp_path / f"t{seed}"
        )
        for seed in (1, 2)
    ]
    assert "lm_head.weight" not in Checkpoint.open(paths[0]).files  # saved once, as the input embeddings
    output = uniform_soup(paths, output_dir=tmp_path / "soup", progress=False)
    states = [_state(path) for path in paths]
    expected = {name: (states[0][name] + states[1][name]) / 2 for name in states[0]}
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _assert_loads_as(output, expected, paths[0], tokens)


def test_soup_of_lora_adapters_of_different_ranks_is_the_mean_of_their_updates(models, adapters, tokens, tmp_path):
    output = uniform_soup(adapters, output_dir=tmp_path / "soup", progress=False)
    merged = [_merged_state(models["base"], adapter) for adapter in adapters]
    expected = {name: sum(state[name] for state in merged) / len(merged) for name in merged[0]}
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 2 + 4 + 2 and config["rank_pattern"] == {
        f"model.layers.{i}.mlp.down_proj": 2 + 4 + 3 for i in range(3)
    }
    _assert_loads_as(output, expected, models["base"], tokens)


def _distance_score(target: dict):
    """A held-out 'score' that a test can predict: minus the distance of the weights to `target`."""

    def score(model):
        state = model.state_dict()
        return -sum((state[name].to(F64) - target[name]).pow(2).sum().item() for name in target)

    return score


def test_greedy_soup_adds_only_strict_improvements_and_records_its_history(models, tokenizer, tmp_path, caplog):
    base = _state(models["base"])
    # good ingredients scatter around the base, so averaging them approaches it; a bad one lies far away; a copy
    # of the best ties with the soup it would join, which the official code's strict `>` rejects
    good = [_save(_perturbed(build_tiny_model(tokenizer, num_layers=3), seed), tokenizer, tmp_path / f"g{seed}")
            for seed in (1, 2, 3)]  # fmt: skip
    bad = _save(_perturbed(build_tiny_model(tokenizer, num_layers=3), 9, scale=0.2), tokenizer, tmp_path / "bad")
    score = _distance_score(base)
    own = {str(path): score(AutoModelForCausalLM.from_pretrained(path)) for path in [*good, bad]}
    best = max(good, key=lambda path: own[str(path)])
    copy = tmp_path / "copy"
    shutil.copytree(best, copy)
    own[str(copy)] = own[str(best)]
    with caplog.at_level(logging.INFO, logger="hf_plugins.merging.soups"):
        result = greedy_soup([bad, *good, copy], score, output_dir=tmp_path / "soup", progress=False)
    ordered = sorted(own, key=own.get, reverse=True)
    assert [entry["ingredient"] for entry in result.history] == ordered
    assert result.history[0] == {"ingredient": str(best), "score": own[str(best)], "best_before": None,
                                 "accepted": True, "soup_size": 1}  # fmt: skip
    decided = {entry["ingredient"]: entry["accepted"] for entry in result.history}
    # the copy comes right after the best (a tie keeps the given order) and leaves the soup's score as it was
    assert result.history[1]["ingredient"] == str(copy) and result.history[1]["score"] == own[str(best)]
    assert decided[str(copy)] is False and decided[str(bad)] is False
    for entry in result.history[1:]:
        assert entry["accepted"] == (entry["score"] > entry["best_before"])
    assert result.ingredients == [entry["ingredient"] for entry in result.history if entry["accepted"]]
    assert len(result.ingredients) >= 2 and result.soup_score > max(own.values())
    states = [_state(path) for path in result.ingredients]
    expected = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
    for name, tensor in _state(result.output_dir).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    assert sum("greedy soup: adding" in record.getMessage() for record in caplog.records) == len(ordered) - 1
    _no_partial_output(tmp_path / "not-there")


def test_greedy_soup_lower_is_better_with_known_scores(models, tmp_path):
    calls = []

    def loss(model):
        calls.append(1)
        return -_distance_score(_state(models["base"]))(model)

    scores = {str(models["ft1"]): 1.0, str(models["ft2"]): 2.0, str(models["ft3"]): 3.0}
    result = greedy_soup(list(scores), loss, False, scores=scores, output_dir=tmp_path / "soup", progress=False)
    assert len(calls) == 2  # only the candidate soups are evaluated
    assert result.history[0]["ingredient"] == str(models["ft1"])  # the lowest loss first
    for entry in result.history[1:]:
        assert entry["accepted"] == (entry["score"] < entry["best_before"])


def test_gather_ingredients_of_a_sweep(models, tmp_path):
    sweep = tmp_path / "sweep"
    for i, name in enumerate(("ft1", "ft2")):
        run = sweep / f"lr{i}"
        shutil.copytree(models[name], run)
        (run / "checkpoint-4").mkdir()
        state = {"log_history": [{"loss": 3.0}, {"eval_loss": 2.5 - i}, {"train_runtime": 1.0}]}
        (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    (sweep / "logs").mkdir()
    found = gather_ingredients([sweep])
    assert found == {str(sweep / "lr0"): 2.5, str(sweep / "lr1"): 1.5}
    with pytest.raises(MergeError, match="holds no saved model"):
        gather_ingredients([sweep / "logs"])


# ------------------------------------------------------------------------------------------------ LiNeS
def _lines_expected(base: dict, finetuned: dict, alpha: float, beta: float, outside: float, layers: int = 3):
    expected = {}
    for name in base:
        layer = layer_index(name)
        factor = outside if layer is None else alpha + beta * layer / (layers - 1)
        expected[name] = base[name] + factor * (finetuned[name] - base[name])
    return expected


@pytest.mark.parametrize("alpha, beta, outside", [(0.2, None, "alpha"), (0.5, 0.3, 1.0)])
def test_lines_scales_each_block_of_a_full_fine_tune(models, tokens, tmp_path, alpha, beta, outside):
    output = lines_scale(
        models["base"], models["ft1"], alpha, beta, outside, output_dir=tmp_path / "lines", max_shard_size=SHARD,
        progress=False,
    )  # fmt: skip
    expected = _lines_expected(
        _state(models["base"]), _state(models["ft1"]), alpha, 1 - alpha if beta is None else beta,
        alpha if outside == "alpha" else outside,
    )  # fmt: skip
    _assert_loads_as(output, expected, models["base"], tokens)


def test_lines_of_a_lora_adapter_scales_b_per_layer(models, adapters, tokens, tmp_path):
    output = lines_scale(models["base"], adapters[1], 0.3, output_dir=tmp_path / "lines", progress=False)
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
    expected = _lines_expected(_state(models["base"]), _merged_state(models["base"], adapters[1]), 0.3, 0.7, 0.3)
    _assert_loads_as(output, expected, models["base"], tokens)


def test_lines_multi_task_alpha_from_the_norm_ratio(models, tokenizer, tmp_path):
    base, tasks = _state(models["base"]), [_state(models["ft1"]), _state(models["ft2"])]
    model = build_tiny_model(tokenizer, num_layers=3)  # task arithmetic: base + tau_1 + tau_2
    model.load_state_dict({name: base[name] + sum(t[name] - base[name] for t in tasks) for name in base})
    merged = _save(model, tokenizer, tmp_path / "merged")
    output = lines_scale(
        models["base"], merged, "norm_ratio", 0.4, output_dir=tmp_path / "lines",
        tasks=[models["ft1"], models["ft2"]], progress=False,
    )  # fmt: skip
    # for task arithmetic the ratio is 1/T
    expected = _lines_expected(base, _state(merged), 0.5, 0.4, 0.5)
    for name, tensor in _state(output).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=2e-6)


def test_lines_callback_writes_a_scaled_copy_at_the_end_of_training(models, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(models["base"])
    callback = LiNeSCallback(alpha=0.4)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    _perturbed(model, 5)  # "training"
    trained = _save(model, tokenizer, tmp_path / "trained")
    callback.on_train_end(args, state, control, model=model, processing_class=tokenizer)
    assert callback.written == tmp_path / "run" / "lines-alpha0.4"
    assert (callback.written / "tokenizer.json").is_file()
    expected = _lines_expected(_state(models["base"]), _state(trained), 0.4, 0.6, 0.4)
    for name, tensor in _state(callback.written).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["lines-alpha0.4"]
    with pytest.raises(ValueError, match="alpha=1.5"):
        LiNeSCallback(alpha=1.5)
    model.config._name_or_path = "some/hub-id"
    with pytest.raises(ValueError, match="not a local folder"):
        LiNeSCallback(alpha=0.4).on_train_begin(args, state, control, model=model)


# ------------------------------------------------------------------------------------------------ transfer
@pytest.mark.parametrize("tied", [False, True])
def test_transfer_pads_the_vocabulary_and_adds_the_update_in_float64(tokenizer, tokens, tmp_path, tied):
    source = build_tiny_model(tokenizer, tie_word_embeddings=tied)
    source_base = _save(source, tokenizer, tmp_path / "source_base")
    target_base = _save(_perturbed(build_tiny_model(tokenizer, tie_word_embeddings=tied), 7), tokenizer,
                        tmp_path / "target_base")  # fmt: skip
    ft_tokenizer = build_tokenizer()
    ft_tokenizer.add_tokens([f"<new{i}>" for i in range(6)])  # tokens added while fine-tuning
    ft = build_tiny_model(tokenizer, tie_word_embeddings=tied)
    ft.resize_token_embeddings(len(ft_tokenizer))
    source_ft = _save(_perturbed(ft, 8), ft_tokenizer, tmp_path / "source_ft")
    output = transfer_finetuning(
        source_ft, source_base, target_base, 0.7, output_dir=tmp_path / "out", max_shard_size=SHARD, progress=False
    )
    src, tgt, fin = _state(source_base), _state(target_base), _state(source_ft)
    expected = {}
    for name, tensor in fin.items():
        pad = (0, 0, 0, tensor.shape[0] - src[name].shape[0]) if tensor.shape != src[name].shape else (0, 0)
        padded_source, padded_target = (torch.nn.functional.pad(state[name], pad) for state in (src, tgt))
        expected[name] = padded_target + 0.7 * (tensor - padded_source)
    assert json.loads((output / "config.json").read_text())["vocab_size"] == len(ft_tokenizer)
    assert len(json.loads((output / "tokenizer.json").read_text())["added_tokens"]) > len(
        tokenizer.added_tokens_decoder
    )
    new_rows = expected["model.embed_tokens.weight"][len(tokenizer) :]
    torch.testing.assert_close(new_rows, 0.7 * fin["model.embed_tokens.weight"][len(tokenizer) :])
    _assert_loads_as(output, expected, target_base, tokens)


def test_transfer_of_a_lora_adapter_is_reattaching_it_to_the_new_base(models, adapters, tokenizer, tokens, tmp_path):
    target_base = _save(_perturbed(build_tiny_model(tokenizer, num_layers=3), 7), tokenizer, tmp_path / "target")
    output = transfer_finetuning(adapters[0], models["base"], target_base, output_dir=tmp_path / "out", progress=False)
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(target_base)
    # theta_target + (theta_ft - theta_source): the source fine-tune is the adapter merged into the source base
    source, target, finetuned = _state(models["base"]), _state(target_base), _merged_state(models["base"], adapters[0])
    expected = {name: target[name] + (finetuned[name] - source[name]) for name in target}
    _assert_loads_as(output, expected, target_base, tokens)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tokenizer, models):
    root = tmp_path_factory.mktemp("odd")
    missing = root / "missing_shard"
    shutil.copytree(models["ft1"], missing)
    shards = sorted(missing.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    narrow = _save(build_tiny_model(tokenizer, num_layers=3, intermediate_size=48), tokenizer, root / "narrow")
    return {
        "qwen2": _save(build_tiny_model(tokenizer, arch="qwen2", num_layers=3), tokenizer, root / "qwen2"),
        "narrow": narrow,
        "bf16": _save(build_tiny_model(tokenizer, num_layers=3, dtype=torch.bfloat16), tokenizer, root / "bf16"),
        "tied": _save(build_tiny_model(tokenizer, num_layers=3, tie_word_embeddings=True), tokenizer, root / "tied"),
        "missing": missing,
        "narrow_adapter": _adapter(narrow, root / "narrow_adapter", 4),
    }


BAD_INPUTS = {
    "different architectures": (lambda m, o, a, out: uniform_soup([m["ft1"], o["qwen2"]], output_dir=out),
                                "different architectures"),
    "different shapes": (lambda m, o, a, out: uniform_soup([m["ft1"], o["narrow"]], output_dir=out), "has shape"),
    "different dtypes": (lambda m, o, a, out: uniform_soup([m["ft1"], o["bf16"]], output_dir=out), "has dtype"),
    "tied and untied": (lambda m, o, a, out: transfer_finetuning(m["ft1"], m["base"], o["tied"], output_dir=out),
                        "tie_word_embeddings"),
    "missing shard": (lambda m, o, a, out: lines_scale(m["base"], o["missing"], 0.5, output_dir=out),
                      r"the shard model-00002-of-\d+\.safetensors, which is missing"),
    "adapter and full model": (lambda m, o, a, out: uniform_soup([m["ft1"], a[0]], output_dir=out),
                               "one is a LoRA adapter"),
    "adapter of another base (LiNeS)": (lambda m, o, a, out: lines_scale(m["base"], o["narrow_adapter"], 0.5,
                                                                         output_dir=out), "does not fit"),
    "adapter of another base (transfer)": (lambda m, o, a, out: transfer_finetuning(
        o["narrow_adapter"], m["base"], m["ft2"], output_dir=out), "does not fit"),
    "bases of different shapes": (lambda m, o, a, out: transfer_finetuning(m["ft1"], m["base"], o["narrow"],
                                                                           output_dir=out), "has shape"),
    "alpha above 1": (lambda m, o, a, out: lines_scale(m["base"], m["ft1"], 1.5, output_dir=out), r"alpha=1\.5"),
    "alpha below 0": (lambda m, o, a, out: lines_scale(m["base"], m["ft1"], -0.1, output_dir=out), r"alpha=-0\.1"),
    "negative beta": (lambda m, o, a, out: lines_scale(m["base"], m["ft1"], 0.5, -1.0, output_dir=out), "beta=-1"),
    "outside not a factor": (lambda m, o, a, out: lines_scale(m["base"], m["ft1"], 0.5, outside="beta",
                                                              output_dir=out), "outside='beta'"),
    "not a folder": (lambda m, o, a, out: uniform_soup([m["ft1"], out.parent / "nowhere"], output_dir=out),
                     "not a folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(models, odd_models, adapters, tmp_path, case):
    run, message = BAD_INPUTS[case]
    output = tmp_path / "out"
    with pytest.raises(MergeError, match=message) as error:
        run(models, odd_models, adapters, output)
    assert "\n" not in str(error.value)
    _no_partial_output(output)


def test_existing_output_is_kept_unless_overwrite(models, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        uniform_soup([models["ft1"], models["ft2"]], output_dir=output)
    assert (output / "keep.txt").read_text() == "mine"
    uniform_soup([models["ft1"], models["ft2"]], output_dir=output, overwrite=True, progress=False)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


def test_a_merge_that_fails_midway_leaves_no_output(models, tmp_path, monkeypatch):
    from hf_plugins.merging import writer

    written = []

    def failing_save(tensors, path, metadata=None):
        if written:
            raise OSError("No space left on device")
        written.append(path)
        writer_save(tensors, path, metadata=metadata)

    writer_save = writer.save_file
    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        uniform_soup([models["ft1"], models["ft2"]], output_dir=tmp_path / "out", max_shard_size=SHARD, progress=False)
    assert written  # one shard had been written
    _no_partial_output(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_soup_lines_and_transfer(models, adapters, tmp_path, capsys):
    soup = tmp_path / "soup"
    assert cli.main(["merge", "soup", "--models", str(models["ft1"]), str(models["ft2"]), "--output", str(soup),
                     "--max_shard_size", SHARD]) == 0  # fmt: skip
    assert f"wrote {soup}" in capsys.readouterr().out
    expected = uniform_soup([models["ft1"], models["ft2"]], output_dir=tmp_path / "api", progress=False)
    for name, tensor in _state(soup).items():
        torch.testing.assert_close(tensor, _state(expected)[name], rtol=0, atol=0)
    config = tmp_path / "lines.yaml"
    config.write_text(f"method: lines\nbase: {models['base']}\nmodel: {adapters[0]}\nalpha: 0.3\noutside: 0.5\n")
    assert cli.main(["merge", "--config", str(config), "--output", str(tmp_path / "lines")]) == 0
    assert (tmp_path / "lines" / "adapter_model.safetensors").is_file()
    assert cli.main(["merge", "transfer", "--source_model", str(models["ft1"]), "--source_base", str(models["base"]),
                     "--target_base", str(models["ft2"]), "--lam", "0.5", "--output", str(tmp_path / "t")]) == 0  # fmt: skip
    assert (tmp_path / "t" / "config.json").is_file()


def test_cli_greedy_soup_imports_the_eval_function(models, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_eval.py").write_text(
        "def negative_norm(model):\n    return -sum(p.double().pow(2).sum().item() for p in model.parameters())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["merge", "soup", "--models", str(models["ft1"]), str(models["ft2"]), "--greedy", "true",
            "--eval_fn", "my_eval.negative_norm", "--output", str(tmp_path / "soup")]  # fmt: skip
    assert cli.main(argv) == 0
    assert "ingredient(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["soup", "--models", "{ft1}", "{qwen2}", "--output", "{out}"], "different architectures"),
        (["lines", "--base", "{base}", "--model", "{ft1}", "--alpha", "2", "--output", "{out}"], "alpha=2.0"),
        (["lines", "--base", "{base}", "--model", "{missing}", "--alpha", "0.5", "--output", "{out}"], "missing"),
        (["transfer", "--source_model", "{ft1}", "--source_base", "{base}", "--output", "{out}"], "--target_base"),
        (["soup", "--models", "{ft1}", "--output", "{out}", "--alpah", "1"], "unrecognized arguments: --alpah"),
        (["soup", "--models", "{ft1}", "--greedy", "true", "--output", "{out}"], "needs --eval_fn"),
        (["blend", "--models", "{ft1}"], "unknown merge method 'blend'"),
        (["--config", "{yaml}"], "`alpah` (a key of the YAML config) is not an option"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_status_2(models, odd_models, tmp_path, capsys, argv, message):
    (tmp_path / "bad.yaml").write_text(f"method: lines\nbase: {models['base']}\nmodel: {models['ft1']}\nalpah: 0.5\n")
    paths = {**{k: str(v) for k, v in {**models, **odd_models}.items()}, "out": str(tmp_path / "out"),
             "yaml": str(tmp_path / "bad.yaml")}  # fmt: skip
    assert cli.main(["merge", *[arg.format(**paths) for arg in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    _no_partial_output(tmp_path / "out")
