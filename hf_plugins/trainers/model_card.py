"""The model card the trainers write: `create_model_card`, called for every checkpoint, by `push_to_hub` and by the
`hf-plugins` command.

TRL's template links the base model and the dataset to the Hub whatever they are, which gives "Model Card for None"
when no name is passed, `[None](https://huggingface.co/None)` for a model loaded from a local folder and
`https://huggingface.co/datasets//path/...` for a local dataset. Here the card is named after the run (the Hub repo
or `output_dir`, as TRL names checkpoint cards), a Hub id gets its link and its metadata (`base_model`, `datasets`),
and a local path is named as it was given, without a link.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


_TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is a fine-tuned version of {{ base_model_text }}{% if dataset_text %}, trained on {{ dataset_text }}
{%- endif %}.
It was trained with {{ trainer_name }} from [hf-plugins](https://pypi.org/project/hf-plugins/), on
[TRL](https://github.com/huggingface/trl).

## Quick start

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{{ model_id }}")
messages = [{"role": "user", "content": "Which would you choose, a trip to the past or to the future, and why?"}]
print(generator(messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```

## Training procedure

{% for name, url in run_links %}[{{ name }}]({{ url }}) {% endfor %}

This model was trained with {{ trainer_name }}{% if paper_id %}, the method of
[{{ paper_title }}](https://huggingface.co/papers/{{ paper_id }}){% endif %}.

### Framework versions

{% for name, value in versions %}- {{ name }}: {{ value }}
{% endfor %}
## Citations
{% if trainer_citation %}
Cite {{ trainer_name }} as:

```bibtex
{{ trainer_citation }}
```
{% endif %}
Cite TRL as:

```bibtex
{% raw %}@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan
             and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}{% endraw %}
```
"""

_VERSIONS = (
    ("hf-plugins", "hf-plugins"),
    ("TRL", "trl"),
    ("Transformers", "transformers"),
    ("PyTorch", "torch"),
    ("Datasets", "datasets"),
    ("Tokenizers", "tokenizers"),
)


def is_hub_repo_id(name) -> bool:
    """`name` is a Hub repo id (`org/name` or `name`) and not a path on this machine."""
    if not isinstance(name, str) or not name or os.path.exists(os.path.expanduser(name)):
        return False
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _named(name: str, hub_url: str) -> str:
    """Markdown for a model or dataset: a link for a Hub id, the name as code for a local path."""
    return f"[{name}]({hub_url}{name})" if is_hub_repo_id(name) else f"`{name}`"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _run_links() -> list[tuple[str, str]]:
    """Links to the experiment trackers of this run (Weights & Biases, Trackio, Comet), where one is active."""
    links = []
    try:
        from transformers import is_wandb_available

        if is_wandb_available():
            import wandb

            if wandb.run is not None:
                links.append(("Weights & Biases run", wandb.run.url))
        from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

        for name, url in (("Trackio", get_trackio_space_url()), ("Comet experiment", get_comet_experiment_url())):
            if url:
                links.append((name, url))
    except ImportError:  # a TRL without these helpers: no links
        pass
    return links


class ModelCardMixin:
    """`create_model_card` for trainers based on TRL's (see the module docstring); expects `_name`, `_paper` and
    `_tag_names` as TRL's trainers define them."""

    def create_model_card(self, model_name: str | None = None, dataset_name=None, tags=None):
        """Write `README.md` to `output_dir`: named `model_name` (default: the Hub repo's name or `output_dir`'s),
        fine-tuned from the model's `_name_or_path`, on `dataset_name` (a Hub id, a local path, or a list of
        them), with the trainer's tags plus `tags`."""
        from huggingface_hub import ModelCard, ModelCardData

        if not self.is_world_process_zero():
            return
        hub_model_id = getattr(self.args, "hub_model_id", None)
        if model_name is None:
            model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(self.args.output_dir).name
        base_model = getattr(self.model.config, "_name_or_path", "") or ""
        datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags |= {"generated_from_trainer", *self._tag_names}
        card_data = ModelCardData(
            base_model=base_model if is_hub_repo_id(base_model) else None,
            datasets=[name for name in datasets if is_hub_repo_id(name)] or None,
            library_name="transformers",
            model_name=model_name,
            tags=sorted(tags),
        )
        card = ModelCard.from_template(
            card_data,
            template_str=_TEMPLATE,
            model_name=model_name,
            model_id=hub_model_id or self.args.output_dir,
            base_model_text=_named(base_model, "https://huggingface.co/") if base_model else "a model built in code",
            dataset_text=" and ".join(_named(name, "https://huggingface.co/datasets/") for name in datasets),
            trainer_name=self._name,
            trainer_citation=self._paper.get("citation"),
            paper_title=self._paper.get("title"),
            paper_id=self._paper.get("id"),
            run_links=_run_links(),
            versions=[(name, _version(package)) for name, package in _VERSIONS],
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
