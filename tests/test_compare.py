"""`hf-plugins compare` / `hf_plugins.compare` on the tiny float64 model: two methods for two steps each."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoModelForCausalLM

import hf_plugins
from hf_plugins import training_script
from hf_plugins.cli import main
from hf_plugins.comparison.evaluation import StartModel, batches, held_out_metrics
from hf_plugins.comparison.report import matplotlib_available
from hf_plugins.modeling import add_loss_head_forward
from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset


METHODS = ["sft", "dft"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("compare")
    DatasetDict(
        {"train": tiny_conversational_dataset(12), "test": tiny_conversational_dataset(6, seed=1)}
    ).save_to_disk(str(root / "data"))
    tiny_conversational_dataset(5, seed=2).save_to_disk(str(root / "general"))
    Dataset.from_dict({"question": ["a"], "answer": ["b"]}).save_to_disk(str(root / "unformatted"))
    config = {
        **CPU_TRAINING_ARGS,
        "model_name_or_path": tiny_model_dir,
        "dataset_name": str(root / "data"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "max_length": 64,
        "learning_rate": 5e-3,
        "disable_tqdm": True,
        "dtype": "auto",  # the tiny model's float64: the metrics are compared with the logits' at 1e-9
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return SimpleNamespace(
        root=root, config=str(root / "run.yaml"), general=str(root / "general"), model=tiny_model_dir
    )


@pytest.fixture(scope="module")
def compared(paths):
    output_dir = paths.root / "out"
    results = hf_plugins.compare(METHODS, paths.config, general_eval_dataset=paths.general, output_dir=output_dir)
    return results, output_dir


def test_writes_results_table_and_plots(compared):
    """The plots where matplotlib is installed (the `dev` and `bench` extras have it), none where it is not."""
    results, output_dir = compared
    for name in ("results.json", "results.md"):
        assert (output_dir / name).is_file(), name
    plots = ["train_loss.png", "eval_loss.png", "drift.png"]
    if matplotlib_available():
        assert all((output_dir / name).is_file() for name in plots), sorted(path.name for path in output_dir.iterdir())
    else:
        assert not any((output_dir / name).exists() for name in plots)
    assert json.loads((output_dir / "results.json").read_text()) == results
    rows = [line for line in (output_dir / "results.md").read_text().splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{method}`" for method in METHODS]
    for method in METHODS:
        run = results["runs"][method]
        assert (output_dir / method / "compare_run.json").is_file() and (output_dir / method / "config.json").is_file()
        assert [entry["step"] for entry in run["train_loss"]] == [1, 2]
        assert [entry["step"] for entry in run["evaluations"]] == [0, 1, 2]
        start, end = run["evaluations"][0], run["evaluations"][-1]
        # the same starting model, scored on the same tokens
        assert start["eval_loss"] == results["runs"][METHODS[0]]["evaluations"][0]["eval_loss"]
        assert start["general_drift"] == 0.0 and end["general_drift"] > 0
        assert end["eval_tokens"] == results["held_out"]["eval"]["tokens"] > 0
    # the two losses train differently from the same start
    assert (
        results["runs"]["sft"]["evaluations"][-1]["eval_loss"]
        != results["runs"]["dft"]["evaluations"][-1]["eval_loss"]
    )


def test_finished_methods_are_not_trained_again(compared, paths, capsys, monkeypatch):
    results, output_dir = compared
    records = {method: (output_dir / method / "compare_run.json").read_text() for method in METHODS}

    def no_training(setup):
        raise AssertionError(f"{setup.method} was trained again")

    monkeypatch.setattr(training_script, "trainer_from", no_training)
    argv = ["compare", "--methods", ",".join(METHODS), "--config", paths.config]
    code = main([*argv, "--general_eval_dataset", paths.general, "--output_dir", str(output_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert all(f"{method}: finished in" in out for method in METHODS)
    assert json.loads((output_dir / "results.json").read_text()) == results
    assert records == {method: (output_dir / method / "compare_run.json").read_text() for method in METHODS}
    # other settings in the same folder: refused, not mixed with the finished runs
    code = main([*argv, "--output_dir", str(output_dir), "--learning_rate", "1e-3"])
    assert code == 2 and "with other settings" in capsys.readouterr().err


def test_held_out_tokens_are_reused_only_with_the_same_settings(compared, paths, tmp_path):
    """A rerun reuses the tokenized held-out sets; other tokenization settings (here `max_length`) tokenize again."""
    import shutil

    results, output_dir = compared
    shutil.copytree(output_dir / "held_out", tmp_path / "held_out")
    shorter = hf_plugins.compare(
        ["sft"], paths.config, args={"max_length": 24, "max_steps": 1}, general_eval_dataset=paths.general,
        output_dir=tmp_path, plots=False, save_models=False,
    )  # fmt: skip
    tokens = shorter["held_out"]["eval"]["tokens"]
    assert 0 < tokens < results["held_out"]["eval"]["tokens"]
    assert len(load_from_disk(str(tmp_path / "held_out" / "eval"))[0]["input_ids"]) <= 24


def test_an_interrupted_method_continues_from_its_checkpoint(paths, tmp_path):
    """A run cut short after a checkpoint continues from it, with the evaluations made before it, to the same end."""
    import shutil

    def run():
        return hf_plugins.compare(
            ["sft"], paths.config, args={"save_strategy": "steps", "save_steps": 1},
            general_eval_dataset=paths.general, output_dir=tmp_path, plots=False, save_models=False,
        )["runs"]["sft"]  # fmt: skip

    uninterrupted = run()
    (tmp_path / "sft" / "compare_run.json").unlink()  # as if stopped after step 1's checkpoint
    shutil.rmtree(tmp_path / "sft" / "checkpoint-2")
    resumed = run()
    assert [entry["step"] for entry in resumed["evaluations"]] == [0, 1, 2]
    for expected, actual in zip(uninterrupted["evaluations"], resumed["evaluations"], strict=True):
        assert actual == pytest.approx(expected, rel=1e-9)
    losses = [[entry["loss"] for entry in run["train_loss"]] for run in (uninterrupted, resumed)]
    assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-9)


def _materialised(model, start, dataset):
    """NLL, token accuracy and KL(start || model) per supervised token from the full logits, in float64."""
    nll = correct = kl = tokens = 0.0
    with torch.no_grad():
        for batch in batches(dataset, 1, 0):
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            log_p = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)[mask]
            log_q = torch.log_softmax(start(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)[mask]
            nll -= log_p.gather(1, labels[mask].unsqueeze(1)).sum().item()
            correct += (log_p.argmax(-1) == labels[mask]).sum().item()
            kl += (log_q.exp() * (log_q - log_p)).sum().item()
            tokens += mask.sum().item()
    return {"loss": nll / tokens, "token_accuracy": correct / tokens, "drift": kl / tokens}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def test_metrics_equal_the_materialised_logits(compared, paths):
    """The fused held-out loss and the drift of the trained model are those of the full logits (float64)."""
    results, output_dir = compared
    general = load_from_disk(str(output_dir / "held_out" / "general"))
    expected = _materialised(_load(output_dir / "dft"), _load(paths.model), general)
    final = results["runs"]["dft"]["evaluations"][-1]
    assert final["general_drift"] == pytest.approx(expected["drift"], rel=1e-9, abs=1e-15)
    assert final["general_loss"] == pytest.approx(expected["loss"], rel=1e-10)
    assert final["general_token_accuracy"] == pytest.approx(expected["token_accuracy"], abs=1e-12)


def test_lora_drift_is_against_the_adapters_off_model_at_any_batch_size(compared, paths):
    """Under PEFT the starting model is the policy with its adapters disabled; the metrics are token-weighted, so the
    evaluation batch size does not change them."""
    from peft import LoraConfig, get_peft_model

    _, output_dir = compared
    general = load_from_disk(str(output_dir / "held_out" / "general"))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(_load(paths.model), lora)
    add_loss_head_forward(policy.get_base_model())
    start = StartModel(SimpleNamespace(model=policy))
    expected = _materialised(policy, _load(paths.model), general)
    assert expected["drift"] > 1e-4  # the adapters change the model
    for batch_size in (1, 2, 5):
        metrics = held_out_metrics(policy, general, batch_size, 0, start_model=start, backend="chunked")
        assert metrics["drift"] == pytest.approx(expected["drift"], rel=1e-9)
        assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-10)
        assert metrics["token_accuracy"] == pytest.approx(expected["token_accuracy"], abs=1e-12)


def _cli(capsys, paths, output_dir, *argv):
    code = main(["compare", "--config", paths.config, "--output_dir", str(output_dir), *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "sft,grpo"], "unknown method 'grpo'"),
        (["--methods", "sft,sft"], "sft listed more than once"),
        (["--methods", "sft,poft"], "no `ref_score` column"),
        (["--methods", "sft,dft", "--asft.kl_coef", "0.1"], "'asft' is not one of the compared methods"),
        (["--methods", "sft,dft", "--kl_coef", "0.1"], "kl_coef"),
        (["--methods", "sft,dft", "--eval_dataset", "unformatted"], "--eval_dataset dataset has the columns"),
        (["--methods", "sft", "--dataset_test_split", "validation"], "no held-out set"),
    ],
)
def test_bad_input_fails_before_training(capsys, paths, tmp_path, argv, message):
    argv = [str(paths.root / arg) if arg == "unformatted" else arg for arg in argv]
    code, err = _cli(capsys, paths, tmp_path / "out", *argv)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert err.startswith("hf-plugins compare: error: ")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    options, held_out = argv[2:], {}
    if "--eval_dataset" in options:
        held_out["eval_dataset"] = options.pop(options.index("--eval_dataset") + 1)
        options.remove("--eval_dataset")
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_plugins.compare(argv[1], paths.config, args=options, output_dir=tmp_path / "api", **held_out)
    assert not (tmp_path / "api").exists()


def test_compare_is_a_command_and_a_lazy_export(capsys):
    assert main(["--help"]) == 0 and "  compare " in capsys.readouterr().out
    assert main(["compare", "--help"]) == 0 and "--general_eval_dataset" in capsys.readouterr().out
    assert hf_plugins.compare.__module__ == "hf_plugins.comparison"
    assert Path(hf_plugins.compare.__code__.co_filename).parent.name == "comparison"
