"""TL-Training: key tokens and their weights (PKT), erroneous-call masking (MAE), the weighted loss and its
normalisations, `TLTrainer` on the tiny offline model, and the tool-call reward (IRM) with TRL's GRPOTrainer.

Key tokens are checked on hand-made names with the fixtures' real (locally trained BPE) tokenizer, MAE on a
multi-turn conversation against the spec's rule turn by turn, the fused head against `weighted_sft_loss` in float64,
and the trainer's loss against a per-sequence mean computed by hand from the model's logits.
"""

import json
import math
import os
import sys

import pytest
import testing_utils
import torch
import torch.nn.functional as F
from datasets import Dataset
from testing_utils import (
    CLI_LORA_DROPOUT,
    F64,
    IGNORE,
    assert_packed_rows,
    assert_same_parameters,
    gen,
    logged,
    per_sequence_weighted_mean,
    run_script,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins import TLConfig, TLTrainer, classify_tool_call, tool_call_reward, weighted_sft_loss
from hf_plugins.data import (
    DEFAULT_ERROR_PATTERNS,
    declared_tools,
    is_error_response,
    key_token_indices,
    mae_trained_turns,
    render_tool_prompt,
)
from hf_plugins.data.tool_calls import pkt_weight, tokenize_tool_conversation
from hf_plugins.ops import fused_linear_loss
from hf_plugins.rewards import TOOL_CALL_CATEGORIES, make_tool_call_reward, parse_tool_call
from hf_plugins.testing import (
    CPU_TRAINING_ARGS,
    TOOL_CHAT_TEMPLATE,
    build_tokenizer,
    tiny_conversational_dataset,
    tiny_tool_calling_dataset,
)
from hf_plugins.trainers.tl_trainer import per_sequence_normalized


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tool_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


def schema(name, *params):
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in params}},
        },
    }


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


PAPER_TOOLS = [
    schema("getPapersByKeywords", "keywords"),
    schema("getPaperDetails", "paper_id"),
    schema("finish", "answer"),
]


def name_tokens(tokenizer, name, left='"', right='"'):
    """The token strings of `name` as it is tokenized between `left` and `right` (the offsets of the tokens)."""
    text = left + name + right
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    low, high = len(left), len(left) + len(name)
    return [text[max(s, low) : min(e, high)] for s, e in encoding["offset_mapping"] if e > low and s < high]


def trained_text(tokenizer, out):
    return tokenizer.decode([i for i, label in zip(out["input_ids"], out["labels"]) if label != IGNORE])


def test_tool_template_renders_plain_conversations_like_the_plain_template(tool_tokenizer):
    from hf_plugins.testing import CHAT_TEMPLATE

    for messages in tiny_conversational_dataset(12)["messages"]:
        for prompt in (False, True):
            assert tool_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == (
                tool_tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=prompt, chat_template=CHAT_TEMPLATE
                )
            )


# ------------------------------------------------------------------------------------------------ PKT key tokens


def test_shared_prefix_gives_two_key_tokens(tool_tokenizer):
    """getPapersByKeywords vs getPaperDetails: the first token, and the token where they diverge after `getPaper`."""
    tokens = name_tokens(tool_tokenizer, "getPapersByKeywords")
    other = name_tokens(tool_tokenizer, "getPaperDetails")
    keys = key_token_indices(tool_tokenizer, "getPapersByKeywords", ["getPaperDetails"], left='"', right='"')
    assert len(keys) == 2 and keys[0] == 0
    shared = "".join(tokens[: keys[1]])
    # everything before the second key token is the common token prefix, and the names differ right there
    assert shared == "".join(other[: keys[1]]) and shared.startswith("get") and "getPaper".startswith(shared[:8])
    assert tokens[keys[1]] != other[keys[1]]
    assert "".join(tokens[keys[1] :]).startswith("s")  # the `s` of getPaper-s-ByKeywords vs getPaper-D-etails


def test_no_shared_prefix_gives_one_key_token(tool_tokenizer):
    assert key_token_indices(tool_tokenizer, "finish", ["getPaperDetails", "get_weather"], '"', '"') == [0]
    assert key_token_indices(tool_tokenizer, "getPaperDetails", [], '"', '"') == [0]
    # the name itself among the others changes nothing
    assert key_token_indices(tool_tokenizer, "finish", ["finish"], '"', '"') == [0]


def test_one_key_token_per_divergence_point(tool_tokenizer):
    """Against two names sharing different prefixes, two divergence points (plus the first token); two names that
    diverge at the same token add it once."""
    tokens = name_tokens(tool_tokenizer, "get_weather")
    keys = key_token_indices(tool_tokenizer, "get_weather", ["get_time", "getPaperDetails"], '"', '"')
    assert len(keys) == 3, (tokens, keys)
    assert "".join(tokens[: keys[1]]) == "get"  # diverges from getPaperDetails at `_`
    assert "".join(tokens[: keys[2]]) == "get_"  # diverges from get_time after `get_`
    others = ["getPaperDetails", "getPaperAuthors"]
    same_point = key_token_indices(tool_tokenizer, "getPapersByKeywords", others, '"', '"')
    assert len(same_point) == 2


def test_a_name_that_is_a_prefix_of_another_keys_the_token_after_it(tool_tokenizer):
    tokens = name_tokens(tool_tokenizer, "get")
    assert key_token_indices(tool_tokenizer, "get", ["getPaperDetails"], '"', '"') == [0, len(tokens)]


def test_pkt_weight_is_clipped():
    assert pkt_weight(num_tokens=12, num_key=2, max_weight=9) == 5.0  # 10 / 2
    assert pkt_weight(num_tokens=40, num_key=2, max_weight=9) == 9.0  # 19 clipped
    assert pkt_weight(num_tokens=3, num_key=2, max_weight=9) == 1.0  # 0.5 clipped up: never below the others
    assert pkt_weight(num_tokens=40, num_key=2, max_weight=1) == 1.0
    assert pkt_weight(num_tokens=5, num_key=0, max_weight=9) == 1.0


@pytest.mark.parametrize("max_weight", [9.0, 1000.0, 1.0])
def test_key_token_weights_in_a_rendered_conversation(tool_tokenizer, max_weight):
    messages = [
        {"role": "user", "content": "Find papers about llamas."},
        {"role": "assistant", "content": None, "tool_calls": [call("getPapersByKeywords", keywords="llamas")]},
    ]
    example = {"messages": messages, "tools": PAPER_TOOLS}
    out = tokenize_tool_conversation(example, tool_tokenizer, max_weight=max_weight)
    ids, labels, weights = out["input_ids"], out["labels"], out["token_weights"]
    assert len(ids) == len(labels) == len(weights)
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    # the trained span is the assistant turn, exactly
    assert trained == list(range(trained[0], trained[-1] + 1))
    assert trained_text(tool_tokenizer, out) == (
        '<tool_call>\n{"name": "getPapersByKeywords", "arguments": {"keywords": "llamas"}}\n</tool_call><|im_end|>'
    )
    assert all(weights[i] == 0.0 for i in range(len(ids)) if labels[i] == IGNORE)
    keys = [i for i in trained if weights[i] != 1.0]
    expected = min(max((len(trained) - 2) / 2, 1.0), max_weight)
    if max_weight == 1.0:
        assert keys == [] and expected == 1.0
        return
    assert len(keys) == 2 and all(weights[i] == expected for i in keys)
    assert expected == (9.0 if max_weight == 9.0 else (len(trained) - 2) / 2)
    key_text = [tool_tokenizer.decode([ids[i]]) for i in keys]
    assert key_text[0] == name_tokens(tool_tokenizer, "getPapersByKeywords")[0]  # the first token of the name
    assert key_text[1].startswith("s")


def test_pkt_off_and_text_turns_weigh_one(tool_tokenizer):
    messages = [
        {"role": "user", "content": "Find papers about llamas."},
        {"role": "assistant", "content": None, "tool_calls": [call("getPapersByKeywords", keywords="llamas")]},
        {"role": "tool", "content": '["P1"]'},
        {"role": "assistant", "content": "I found P1."},
    ]
    example = {"messages": messages, "tools": json.dumps(PAPER_TOOLS)}  # tools as a JSON string, as TRL accepts
    off = tokenize_tool_conversation(example, tool_tokenizer, pkt=False)
    on = tokenize_tool_conversation(example, tool_tokenizer)
    assert off["labels"] == on["labels"] and off["input_ids"] == on["input_ids"]
    assert {w for w, label in zip(off["token_weights"], off["labels"]) if label != IGNORE} == {1.0}
    # with PKT only the call's two key tokens move; the final text answer weighs 1 throughout
    moved = [i for i, (a, b) in enumerate(zip(off["token_weights"], on["token_weights"])) if a != b]
    end_of_call = on["input_ids"].index(tool_tokenizer.convert_tokens_to_ids("<|im_end|>"), moved[0])
    assert len(moved) == 2 and max(moved) < end_of_call


def test_content_before_the_call_is_not_searched_for_the_name(tool_tokenizer):
    messages = [
        {"role": "user", "content": "Details of P1?"},
        {
            "role": "assistant",
            "content": "I call getPaperDetails now.",
            "tool_calls": [call("getPaperDetails", paper_id="P1")],
        },
    ]
    out = tokenize_tool_conversation({"messages": messages, "tools": PAPER_TOOLS}, tool_tokenizer)
    text = tool_tokenizer.apply_chat_template(messages, tools=PAPER_TOOLS, tokenize=False)
    call_start = text.index('"name": "getPaperDetails"')
    encoding = tool_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    keys = [i for i, w in enumerate(out["token_weights"]) if w > 1]
    assert len(keys) == 2 and all(encoding["offset_mapping"][i][0] > call_start for i in keys)


# ------------------------------------------------------------------------------------------------------------ MAE

ERROR = "Error: getPaperDetails() got an unexpected keyword argument 'id'"
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about paper P3."},
    {"role": "assistant", "content": None, "tool_calls": [call("getPaperDetails", id="P3")]},  # 2: erroneous call
    {"role": "tool", "content": ERROR},
    {"role": "assistant", "content": None, "tool_calls": [call("getPaperDetails", paper_id="P3")]},  # 4: corrected
    {"role": "tool", "content": '{"title": "On llamas"}'},
    {"role": "assistant", "content": "P3 is called On llamas."},  # 6: followed by a user turn
    {"role": "user", "content": "Thanks. Find papers about bread."},
    {"role": "assistant", "content": None, "tool_calls": [call("getPapersByKeywords", keywords="bread")]},  # 8
    {"role": "tool", "content": "ConnectionError: host unreachable"},
    {"role": "assistant", "content": "The search failed."},  # 10: last message
]


def test_mae_keeps_and_drops_each_turn_as_the_spec_says():
    kept = mae_trained_turns(MULTI_TURN)
    assert [i for i, k in enumerate(kept) if k] == [4, 10]
    # without MAE's rule (a): only erroneous responses matter
    assert mae_trained_turns(MULTI_TURN[:7]) == [False, False, False, False, True, False, True]


def test_error_patterns_are_matched_on_lowercased_alphanumerics():
    assert is_error_response("connection-ERROR!!") and is_error_response("Connection Error")
    assert is_error_response({"error": "quota"})  # JSON responses are serialised: `"error":`
    assert is_error_response([{"type": "text", "text": "400 client error: bad"}])
    assert not is_error_response('{"title": "On llamas"}') and not is_error_response(None)
    # documented consequence of the official normalisation: `'error'` reduces to `error`, a substring of "errors"
    assert is_error_response("No errors found.")
    assert not is_error_response("No errors found.", error_patterns=["unexpected keyword"])
    assert is_error_response("Quota exceeded", error_patterns=["quota exceeded"])
    assert len(DEFAULT_ERROR_PATTERNS) == 14


def test_masked_call_stays_in_the_context(tool_tokenizer):
    tools = [*PAPER_TOOLS]
    out = tokenize_tool_conversation({"messages": MULTI_TURN, "tools": tools}, tool_tokenizer)
    full = tool_tokenizer.decode(out["input_ids"])
    trained = trained_text(tool_tokenizer, out)
    bad_call = '{"name": "getPaperDetails", "arguments": {"id": "P3"}}'
    good_call = '{"name": "getPaperDetails", "arguments": {"paper_id": "P3"}}'
    assert bad_call in full and bad_call not in trained  # in the context, never a target
    assert full.index(bad_call) < full.index(good_call)
    assert trained == f"<tool_call>\n{good_call}\n</tool_call><|im_end|>The search failed.<|im_end|>"
    # masked tokens weigh 0
    assert all(w == 0.0 for w, label in zip(out["token_weights"], out["labels"]) if label == IGNORE)
    # MAE off: every assistant turn is a target
    off = tokenize_tool_conversation({"messages": MULTI_TURN, "tools": tools}, tool_tokenizer, mae=False)
    assert bad_call in trained_text(tool_tokenizer, off)
    assert "P3 is called On llamas." in trained_text(tool_tokenizer, off)
    # custom patterns: the ConnectionError response no longer counts, the unexpected-keyword one does
    custom = tokenize_tool_conversation(
        {"messages": MULTI_TURN, "tools": tools}, tool_tokenizer, error_patterns=["unexpected keyword"]
    )
    assert '"keywords": "bread"' in trained_text(tool_tokenizer, custom)
    assert bad_call not in trained_text(tool_tokenizer, custom)


def test_prompt_completion_rows_train_the_completion_only(tool_tokenizer):
    example = {"prompt": MULTI_TURN[:6], "completion": [MULTI_TURN[6]], "tools": PAPER_TOOLS}
    out = tokenize_tool_conversation(example, tool_tokenizer)
    assert trained_text(tool_tokenizer, out) == "P3 is called On llamas.<|im_end|>"


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_tool_calls_without_tools_raise(tool_tokenizer):
    for tools in (None, [], "[]"):
        with pytest.raises(ValueError, match="declares no tools.*`tools` column"):
            tokenize_tool_conversation({"messages": MULTI_TURN, "tools": tools}, tool_tokenizer)
    with pytest.raises(ValueError, match="declares no tools"):
        tokenize_tool_conversation({"messages": MULTI_TURN}, tool_tokenizer)
    # a conversation without tool calls needs no tools
    plain = tokenize_tool_conversation({"messages": tiny_conversational_dataset(1)[0]["messages"]}, tool_tokenizer)
    assert any(label != IGNORE for label in plain["labels"])


def test_undeclared_tool_and_bad_schema_raise(tool_tokenizer):
    with pytest.raises(ValueError, match="calls the tool 'getPaperDetails', which its `tools` do not declare"):
        tokenize_tool_conversation({"messages": MULTI_TURN, "tools": [schema("finish", "answer")]}, tool_tokenizer)
    with pytest.raises(ValueError, match="A tool schema has no `name`"):
        nameless = [{"type": "function", "function": {}}]
        tokenize_tool_conversation({"messages": MULTI_TURN, "tools": nameless}, tool_tokenizer)
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenize_tool_conversation({"messages": MULTI_TURN, "tools": "{oops"}, tool_tokenizer)
    with pytest.raises(ValueError, match="needs conversational rows"):
        tokenize_tool_conversation({"text": "hello"}, tool_tokenizer)


def test_template_without_generation_markers_raises(tool_tokenizer):
    plain = TOOL_CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match="generation"):
        tokenize_tool_conversation({"messages": MULTI_TURN, "tools": PAPER_TOOLS}, tool_tokenizer, chat_template=plain)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"max_weight": 0.5}, "max_weight"),
        ({"max_weight": float("nan")}, "max_weight"),
        ({"max_weight": True}, "max_weight"),
        ({"weight_normalization": "batch"}, "weight_normalization"),
        ({"error_patterns": ["!!"]}, "error_patterns"),
        ({"error_patterns": "error"}, "error_patterns"),
        ({"loss_type": "dft"}, "loss_type"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        TLConfig(output_dir=str(tmp_path), **CPU_TRAINING_ARGS, **overrides)


def test_config_defaults(tmp_path):
    config = TLConfig(output_dir=str(tmp_path), **CPU_TRAINING_ARGS)
    assert (config.max_weight, config.weight_normalization, config.pkt, config.mae) == (9.0, "sample", True, True)
    assert config.assistant_only_loss and config.error_patterns is None


# ------------------------------------------------------------------------------------ the loss and its reductions


def random_batch(B=3, T=9, V=23, D=6, seed=0):
    g = gen(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=F64, requires_grad=True)
    weight = (torch.randn(V, D, generator=g, dtype=F64) / 2).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = IGNORE
    labels[1, 5:] = IGNORE
    weights = torch.ones(B, T, dtype=F64)
    weights[0, 3] = weights[2, 4] = weights[2, 7] = 9.0  # key tokens
    weights[labels == IGNORE] = 0.0
    return hidden, weight, labels, weights


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("normalization", ["sample", "token"])
def test_fused_weighted_head_matches_weighted_sft_loss_float64(backend, normalization):
    hidden, weight, labels, weights = random_batch()
    if normalization == "sample":
        # as the trainer feeds the head (its labels are one position longer, hence the padding column)
        padded = torch.cat([torch.full((3, 1), IGNORE), labels], 1)
        weights = per_sequence_normalized(torch.cat([torch.zeros(3, 1, dtype=F64), weights], 1), padded)[:, 1:]
        num_items = 3
    else:
        num_items = int((labels != IGNORE).sum())
    loss = fused_linear_loss(
        hidden,
        weight,
        labels,
        "weighted",
        backend=backend,
        chunk_size=4,
        token_weights=weights,
        num_items_in_batch=num_items,
    )
    grads = torch.autograd.grad(loss, [hidden, weight])
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    expected = weighted_sft_loss(h @ w.t(), labels, weights, num_items_in_batch=num_items)
    expected_grads = torch.autograd.grad(expected, [h, w])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for grad, exp in zip(grads, expected_grads):
        torch.testing.assert_close(grad, exp, rtol=1e-10, atol=1e-12)
    if normalization == "sample":
        _, _, _, raw = random_batch()
        by_hand = per_sequence_weighted_mean((h @ w.t()).detach(), labels, raw)
        torch.testing.assert_close(expected, by_hand, rtol=1e-12, atol=0)


def test_all_weights_one_is_the_per_sample_mean_sft_loss():
    hidden, weight, labels, _ = random_batch(seed=1)
    ones = (labels != IGNORE).to(F64)
    padded = torch.cat([torch.full((3, 1), IGNORE), labels], 1)
    normalized = per_sequence_normalized(torch.cat([torch.zeros(3, 1, dtype=F64), ones], 1), padded)[:, 1:]
    logits = (hidden @ weight.t()).detach()
    loss = weighted_sft_loss(logits, labels, normalized, num_items_in_batch=3)
    mask = labels != IGNORE
    per_sample = [F.cross_entropy(logits[b][mask[b]], labels[b][mask[b]]) for b in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=1e-12, atol=0)
    # ...which is not the token mean here (the sequences have different lengths): the check can fail
    assert not torch.isclose(loss, F.cross_entropy(logits[mask], labels[mask]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- the trainer


def make_trainer(model_dir, output_dir, dataset=None, **overrides):
    """`TLTrainer` on 16 tool-calling conversations (by default), rendered with the tool-calling template."""
    return testing_utils.make_trainer(
        TLTrainer,
        TLConfig,
        model_dir,
        output_dir,
        tiny_tool_calling_dataset(16) if dataset is None else dataset,
        chat_template=TOOL_CHAT_TEMPLATE,
        **{"per_device_train_batch_size": 4, **overrides},
    )


def manual_loss(trainer, batch, normalization):
    """The loss of a collated batch from the model's materialised logits, reduced by hand."""
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logits, labels, weights = logits[:, :-1], batch["labels"][:, 1:], batch["token_weights"][:, 1:].double()
    if normalization == "sample":
        return per_sequence_weighted_mean(logits, labels, weights)
    mask = labels != IGNORE
    return (weights[mask] * F.cross_entropy(logits[mask], labels[mask], reduction="none")).sum() / mask.sum()


@pytest.mark.parametrize("normalization", ["sample", "token"])
@pytest.mark.parametrize("pkt", [True, False])
def test_trainer_loss_is_the_normalised_weighted_nll(tiny_model_dir, tmp_path, normalization, pkt):
    trainer = make_trainer(tiny_model_dir, tmp_path, weight_normalization=normalization, pkt=pkt, mae=pkt)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["token_weights"].shape == batch["input_ids"].shape
    assert (batch["token_weights"].max() > 1) == pkt
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss.double(), manual_loss(trainer, batch, normalization), rtol=1e-5, atol=1e-6)


def test_all_weights_one_trainer_loss_is_the_per_sample_mean_not_the_token_mean(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, pkt=False, mae=False)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch)).double()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    mask = labels != IGNORE
    per_sample = torch.stack([F.cross_entropy(logits[b][mask[b]], labels[b][mask[b]]) for b in range(len(labels))])
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
    assert abs(loss - F.cross_entropy(logits[mask], labels[mask])) > 1e-4


@pytest.mark.parametrize("normalization", ["sample", "token"])
def test_num_items_in_batch_counts_sequences_or_tokens(tiny_model_dir, tmp_path, normalization):
    """What the training loop divides the summed loss by, over the micro-batches of one accumulated step."""
    trainer = make_trainer(tiny_model_dir, tmp_path, weight_normalization=normalization, per_device_train_batch_size=3)
    batches = list(iter(trainer.get_train_dataloader()))[:2]
    for batch in batches:  # a sequence whose only trained tokens weigh 0 does not count
        batch["token_weights"][0] = 0.0
    count = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    if normalization == "sample":
        assert int(count) == 2 * 3 - 2
    else:
        assert int(count) == sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def test_trainer_trains_full_model(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=4)
    assert set(trainer.train_dataset.column_names) == {"input_ids", "labels", "token_weights"}
    changed = train_and_list_changed_parameters(trainer)
    losses = logged(trainer)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert changed
    # the mean PKT weight per trained token: above 1 (key tokens), far below the clip (most tokens weigh 1)
    assert all(1 < w < 9 for w in logged(trainer, "token_weight"))


def test_trainer_with_lora_trains_only_adapters(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=tiny_lora_config(), learning_rate=5e-2)
    changed = train_and_list_changed_parameters(trainer)
    assert changed and all("lora_" in name for name in changed), sorted(changed)
    assert all(math.isfinite(x) for x in logged(trainer))


def test_gradient_accumulation_4x1_equals_1x4_with_sample_normalisation(tiny_model_dir, tmp_path):
    """The global sequence count makes each micro-batch add its exact share of the mean over sequences."""
    runs = []
    for batch, accumulation, normalization in ((4, 1, "sample"), (1, 4, "sample"), (4, 1, "token")):
        trainer = make_trainer(
            tiny_model_dir,
            tmp_path / f"{batch}x{accumulation}{normalization}",
            optim="sgd",
            learning_rate=0.5,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            weight_normalization=normalization,
        )
        trainer.train()
        runs.append(trainer)
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), abs=1e-5)
    assert_same_parameters(runs[0], runs[1])
    assert logged(runs[2]) != pytest.approx(logged(runs[0]), abs=1e-4)  # token normalisation is another loss


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
def test_resume_from_checkpoint(tiny_model_dir, tmp_path, lora_dropout):
    settings = dict(max_steps=4, per_device_train_batch_size=2)

    def make(output_dir, **overrides):
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        return make_trainer(tiny_model_dir, output_dir, peft_config=peft_config, **settings, **overrides)

    full, resumed, _ = uninterrupted_and_resumed(make, tmp_path)
    assert len(logged(resumed)) == 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-6)
    assert_same_parameters(full, resumed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_length_truncates_the_weights_with_the_tokens(tiny_model_dir, tmp_path, tool_tokenizer, mode):
    dataset = tiny_tool_calling_dataset(16)
    trainer = make_trainer(
        tiny_model_dir, tmp_path, dataset=dataset, max_length=200, truncation_mode=mode, max_steps=2
    )
    full = [tokenize_tool_conversation(row, tool_tokenizer) for row in dataset]
    rows = trainer.train_dataset
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["token_weights"]) <= 200 for r in rows)
    cut = slice(None, 200) if mode == "keep_start" else slice(-200, None)
    kept = [{k: v[cut] for k, v in f.items()} for f in full if any(label != IGNORE for label in f["labels"][cut])]
    assert 0 < len(rows) == len(kept) < 16 if mode == "keep_start" else len(rows) == len(kept)
    for row, expected in zip(rows, kept):
        assert row["input_ids"] == expected["input_ids"] and row["token_weights"] == expected["token_weights"]
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))


def test_evaluation_uses_the_same_loss(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    metrics = trainer.evaluate(tiny_tool_calling_dataset(8, seed=3))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_token_weight"] > 1


def test_trainer_bad_datasets_raise(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="declares no tools"):
        make_trainer(tiny_model_dir, tmp_path, dataset=tiny_tool_calling_dataset(4).remove_columns("tools"))
    with pytest.raises(ValueError, match="not conversational"):  # TRL's own check, before ours
        make_trainer(tiny_model_dir, tmp_path, dataset=Dataset.from_dict({"text": ["a b c", "d e f"]}))
    tokenized = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]})
    with pytest.raises(ValueError, match="`labels` and `token_weights`"):
        make_trainer(tiny_model_dir, tmp_path, dataset=tokenized, assistant_only_loss=False)


def test_pretokenized_rows_are_truncated_with_their_weights(tiny_model_dir, tmp_path, tool_tokenizer):
    rows = [tokenize_tool_conversation(row, tool_tokenizer) for row in tiny_tool_calling_dataset(8)]
    dataset = Dataset.from_list(rows)
    trainer = make_trainer(tiny_model_dir, tmp_path, dataset=dataset, assistant_only_loss=False, max_length=300)
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows) and max(len(r["input_ids"]) for r in rows) > 300
    for row, original in zip(prepared, rows):
        assert row["input_ids"] == original["input_ids"][:300]
        assert row["token_weights"] == original["token_weights"][:300]
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer))


@pytest.mark.parametrize("normalization", ["sample", "token"])
@pytest.mark.parametrize("batching", ["packing", "padding_free"])
def test_packed_and_padding_free_training_equal_padded_training(tiny_model_dir, tmp_path, normalization, batching):
    """One full batch a step, so both runs train on the same tokens: packed (`bfd`, several sequences a row, all
    flattened into one padding-free row) or padding-free, the weights must stay with their tokens and "sample" must
    normalise and count each packed sequence, not each row."""
    dataset = tiny_tool_calling_dataset(12)
    settings = dict(
        per_device_train_batch_size=12,
        optim="sgd",
        learning_rate=2.0,
        weight_normalization=normalization,
        max_steps=3,
    )
    padded = make_trainer(tiny_model_dir, tmp_path / "padded", dataset, **settings)
    flat = {"packing": True} if batching == "packing" else {"padding_free": True, "max_length": None}
    packed = make_trainer(tiny_model_dir, tmp_path / batching, dataset, **settings, **flat)
    assert_packed_rows(padded, packed, batching == "packing", fewer_than=12)
    batch = next(iter(packed.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["token_weights"].shape == batch["input_ids"].shape
    count = int(packed._get_num_items_in_batch([batch], torch.device("cpu")))
    assert count == (12 if normalization == "sample" else int((batch["labels"] != IGNORE).sum()))
    before = [p.detach().clone() for p in padded.model.parameters()]
    for trainer in (padded, packed):
        trainer.train()
    for key in ("loss", "token_weight"):
        assert logged(packed, key) == pytest.approx(logged(padded, key), rel=1e-5), key
    assert max((p - q).abs().max() for p, q in zip(padded.model.parameters(), before)) > 1e-2
    assert_same_parameters(padded, packed)


def test_wrapped_packing_keeps_the_weights_with_their_tokens(tiny_model_dir, tmp_path):
    """`wrapped` cuts the token stream every `max_length` tokens, sequences included: the weights are cut with it, and
    "token" normalisation (a sum over tokens) gives the weighted NLL of the packed rows."""
    dataset = tiny_tool_calling_dataset(8)
    unpacked = make_trainer(tiny_model_dir, tmp_path / "unpacked", dataset, weight_normalization="token")
    wrapped = make_trainer(
        tiny_model_dir,
        tmp_path / "wrapped",
        dataset,
        weight_normalization="token",
        packing=True,
        packing_strategy="wrapped",
        max_length=128,
    )
    rows = wrapped.train_dataset
    assert all(len(r["token_weights"]) == len(r["input_ids"]) for r in rows) and len(rows) > len(dataset)
    for column in ("input_ids", "labels", "token_weights"):
        assert sum(rows[column], []) == sum(unpacked.train_dataset[column], []), column
    batch = next(iter(wrapped.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 128 and (batch["token_weights"] > 1).any()
    wrapped.model.train()
    loss = wrapped.compute_loss(wrapped.model, dict(batch))
    torch.testing.assert_close(loss.double(), manual_loss(wrapped, batch, "token"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["wrapped", "bfd_split"])
def test_sample_normalisation_refuses_packing_that_cuts_sequences(tiny_model_dir, tmp_path, strategy):
    with pytest.raises(
        ValueError,
        match=f"packing_strategy='{strategy}'` cuts sequences.*TLTrainer needs each "
        "sequence whole.*weight_normalization='sample'",
    ):
        make_trainer(tiny_model_dir, tmp_path, packing=True, packing_strategy=strategy)
    trainer = make_trainer(
        tiny_model_dir, tmp_path, packing=True, packing_strategy=strategy, weight_normalization="token", max_length=128
    )
    assert all(len(r["token_weights"]) == len(r["input_ids"]) <= 128 for r in trainer.train_dataset)


# ------------------------------------------------------------------------------------------- the reward (IRM)

REWARD_TOOLS = [schema("get_weather", "city", "unit"), schema("get_time", "city"), schema("search", "query")]
GOLD = "get_weather(city='Paris')"

# (category, predicted name, predicted arguments, gold call)
CASES = [
    ("tool_hallucination", "get_forecast", {"city": "Paris"}, GOLD),
    ("wrong_tool", "get_time", {"city": "Paris"}, GOLD),
    ("param_hallucinated_redundant_missing", "get_weather", {"town": "Paris", "unit": "C"}, GOLD),
    ("param_hallucinated_and_redundant_or_missing", "get_weather", {"town": "Paris"}, GOLD),
    ("param_hallucinated_and_redundant_or_missing", "get_weather", {"city": "Paris", "unit": "C", "day": "1"}, GOLD),
    ("param_redundant_and_missing", "get_weather", {"unit": "C"}, GOLD),
    ("param_hallucinated", "get_weather", {"city": "Paris", "town": "x"}, GOLD),
    ("param_redundant_or_missing", "get_weather", {"city": "Paris", "unit": "C"}, GOLD),
    ("param_redundant_or_missing", "get_weather", {"city": "Paris"}, "get_weather(city='Paris', unit='C')"),
    ("wrong_value", "get_weather", {"city": "Rome"}, GOLD),
    ("correct", "get_weather", {"city": "Paris"}, GOLD),
    ("correct", "get_weather", {"unit": "C", "city": "Paris"}, "get_weather(city='Paris', unit='C')"),
]
REWARDS = {
    "format_error": -2,
    "tool_hallucination": -2,
    "wrong_tool": -1.5,
    "param_hallucinated_redundant_missing": -1.8,
    "param_hallucinated_and_redundant_or_missing": -1.3,
    "param_redundant_and_missing": -1.0,
    "param_hallucinated": -0.8,
    "param_redundant_or_missing": -0.5,
    "wrong_value": -0.25,
    "correct": 1.0,
}


def python_form(name, arguments):
    return f"{name}(" + ", ".join(f"{k}='{v}'" for k, v in arguments.items()) + ")"


def json_form(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_category_table_is_the_spec_table():
    assert TOOL_CALL_CATEGORIES == REWARDS
    assert list(TOOL_CALL_CATEGORIES) == list(REWARDS)  # the order they are checked in


@pytest.mark.parametrize("form", [python_form, json_form], ids=["python", "json"])
@pytest.mark.parametrize("category, name, arguments, gold", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_category_gets_the_spec_reward(form, category, name, arguments, gold):
    completion = form(name, arguments)
    assert classify_tool_call(completion, gold, REWARD_TOOLS) == category
    # the gold call in JSON form (and as a dict) gives the same verdict
    gold_call = parse_tool_call(gold, strict=False)
    gold_json = json.dumps({"name": gold_call.name, "arguments": gold_call.arguments})
    assert classify_tool_call(completion, gold_json, REWARD_TOOLS) == category
    rewards = tool_call_reward(
        prompts=["p"], completions=[completion], gold_call=[gold], tools=[json.dumps(REWARD_TOOLS)]
    )
    assert rewards == [REWARDS[category]]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "   ",
        None,
        "I do not know which tool to use.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',  # malformed JSON
        '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
        '<tool_call>["nothing"]</tool_call>',
        '{"arguments": {"city": "Paris"}}',  # no name
        12,
        [],
        [{"role": "assistant", "content": ""}],
    ],
)
def test_unparsable_completions_are_format_errors_and_never_raise(completion):
    assert classify_tool_call(completion, GOLD, REWARD_TOOLS) == "format_error"


def test_two_calls_are_judged_on_the_first():
    assert classify_tool_call("get_time(city='Paris') get_weather(city='Paris')", GOLD, REWARD_TOOLS) == "wrong_tool"
    two = json_form("get_weather", {"city": "Paris"}) + json_form("get_time", {"city": "Paris"})
    assert classify_tool_call(two, GOLD, REWARD_TOOLS) == "correct"


def test_message_completions_and_parsed_tool_calls():
    text = [{"role": "assistant", "content": "Calling it: get_weather(city='Paris')"}]
    assert classify_tool_call(text, GOLD, REWARD_TOOLS) == "correct"
    parsed = [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Rome")]}]
    assert classify_tool_call(parsed, GOLD, REWARD_TOOLS) == "wrong_value"


def test_strict_parsing_is_the_official_one_and_lenient_is_opt_in():
    double_quoted = 'get_weather(city="Paris")'
    assert classify_tool_call(double_quoted, GOLD, REWARD_TOOLS) == "param_redundant_or_missing"  # no key read
    assert classify_tool_call(double_quoted, GOLD, REWARD_TOOLS, strict=False) == "correct"
    numeric = {"name": "search", "arguments": {"query": 3}}
    assert classify_tool_call(numeric, "search(query='3')", REWARD_TOOLS) == "wrong_value"
    assert classify_tool_call(numeric, "search(query='3')", REWARD_TOOLS, strict=False) == "correct"
    assert classify_tool_call("get_weather(city='paris ')", GOLD, REWARD_TOOLS, strict=False) == "correct"


def test_reward_logs_category_counts_and_checks_its_columns():
    logs = {}
    completions = ["get_weather(city='Paris')", "nothing", "get_weather(city='Rome')", "nothing either"]
    rewards = tool_call_reward(
        prompts=["p"] * 4,
        completions=completions,
        gold_call=[GOLD] * 4,
        tools=[REWARD_TOOLS] * 4,
        log_metric=lambda name, value: logs.__setitem__(name, value),
        trainer_state=None,
    )
    assert rewards == [1.0, -2.0, -0.25, -2.0]
    assert logs["tool_call/format_error"] == 2
    assert logs["tool_call/correct"] == 1 and logs["tool_call/wrong_value"] == 1
    assert set(logs) == {f"tool_call/{c}" for c in REWARDS} and sum(logs.values()) == 4
    with pytest.raises(ValueError, match="`gold_call`"):
        tool_call_reward(prompts=["p"], completions=["x"], tools=[REWARD_TOOLS])
    with pytest.raises(ValueError, match="cannot be parsed"):
        tool_call_reward(prompts=["p"], completions=["x"], gold_call=["no call here"], tools=[REWARD_TOOLS])
    custom = make_tool_call_reward(gold_column="answer", tools_column="schemas")
    assert custom.__name__ == "tool_call_reward"
    assert custom(completions=[GOLD], answer=[GOLD], schemas=[REWARD_TOOLS]) == [1.0]


def test_render_tool_prompt_writes_each_rows_tools(tool_tokenizer):
    dataset = tiny_tool_calling_dataset(6, seed=1)
    prompts = dataset.map(render_tool_prompt, fn_kwargs={"tokenizer": tool_tokenizer}, remove_columns=["messages"])
    assert prompts.column_names == ["tools", "gold_call", "prompt"]
    for row, prompt in zip(dataset, prompts["prompt"]):
        first_call = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        context = [{k: v for k, v in m.items() if v is not None} for m in row["messages"][:first_call]]
        assert prompt == tool_tokenizer.apply_chat_template(
            context, tools=json.loads(row["tools"]), add_generation_prompt=True, tokenize=False
        )
        assert all(f"\n{name}(" in prompt for name in declared_tools(row["tools"]))
        assert prompt.endswith("<|im_start|>assistant\n") and "<tool_call>" not in prompt
    # a conversational `prompt` column is rendered as it is
    row = {"prompt": [{"role": "user", "content": "Hi"}], "tools": dataset[0]["tools"]}
    assert render_tool_prompt(row, tool_tokenizer)["prompt"].startswith("<|im_start|>system\nTools:")


def test_render_tool_prompt_swaps_a_template_that_drops_the_tools(tiny_tokenizer):
    """SmolLM2's original template ignores `tools` (the cause of the all-`format_error` GRPO runs on SmolLM2): its
    shipped training version writes them, and renders everything else identically."""
    from hf_plugins.chat_templates import TEMPLATES_DIR, load_template

    tiny_tokenizer.chat_template = (TEMPLATES_DIR / "smollm2.jinja").read_text()
    row = tiny_tool_calling_dataset(1, seed=1)[0]
    prompt = render_tool_prompt(row, tiny_tokenizer)["prompt"]
    assert "You have access to the following tools:\n<tools>[" in prompt
    assert all(f'"name": "{name}"' in prompt for name in declared_tools(row["tools"]))
    assert prompt == render_tool_prompt(row, tiny_tokenizer, chat_template=load_template("smollm2"))["prompt"]
    without_tools = render_tool_prompt({**row, "tools": None}, tiny_tokenizer)["prompt"]
    context = [m for m in row["messages"] if m["role"] in ("system", "user")][:2]
    assert without_tools == tiny_tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)

    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="writes nothing for the row's `tools`"):
        render_tool_prompt(row, tiny_tokenizer)
    with pytest.raises(ValueError, match="needs a `messages` column"):
        render_tool_prompt({"text": "hi"}, tiny_tokenizer)


def test_grpo_trainer_runs_two_steps_with_the_reward(tiny_model_dir, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-3,
        beta=0.0,
        **CPU_TRAINING_ARGS,
    )
    dataset = tiny_tool_calling_dataset(8, seed=1).map(
        render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"]
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=[tool_call_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(steps) == 2
    for entry in steps:
        # every completion of the step falls in exactly one category (4 completions per reward call)
        assert sum(entry[f"tool_call/{c}"] for c in REWARDS) == pytest.approx(4)
        assert entry["rewards/tool_call_reward/mean"] == pytest.approx(entry["reward"])


@pytest.mark.slow
def test_examples_run_offline(tmp_path):
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sft = run_script(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "tl_training", "sft.py"),
            "--output-dir",
            tmp_path / "sft",
            "--max-steps",
            "5",
            "--rows",
            "16",
        ],
        env=env,
    )
    assert "model saved" in sft.stdout
    grpo = run_script(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "tl_training", "grpo.py"),
            "--model",
            tmp_path / "sft",
            "--output-dir",
            tmp_path / "grpo",
            "--max-steps",
            "2",
            "--rows",
            "8",
        ],
        env=env,
    )
    assert "FusedGRPOTrainer, last step: mean reward" in grpo.stdout  # the fused head, a drop-in
