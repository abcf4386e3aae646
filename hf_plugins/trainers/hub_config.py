"""Method configs as Hub artifacts: `save_pretrained`, `from_pretrained` and `push_to_hub` for every config.

A config is saved as one YAML file (the same keys `trl sft --config` and `hf-plugins <method> --config` read: only
the fields the user changed) plus a README model-card stub, in the layout of a Hub repository.
Secrets (`hub_token`) are never written. YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tempfile
from pathlib import Path


CONFIG_NAME = "hf_plugins_config.yaml"
#: Fields never written to a shared file.
SECRET_FIELDS = ("hub_token", "push_to_hub_token")
#: Fields whose defaults fail the config's checks on some machines (bf16 without a GPU)
_DEVICE_FIELDS = ("use_cpu", "bf16", "fp16")


def _plain(value):
    """A YAML-safe copy of a config value (enums by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def read_config_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file, read safely; a clear `ValueError` for anything else."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as error:
        raise ValueError(
            f"{path} uses a YAML tag that safe loading refuses ({error.problem}): config files may hold only plain "
            "values (numbers, strings, lists, mappings)."
        ) from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config fields, got {type(data).__name__}.")
    return data


def resolve_config_file(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir=None, token=None):
    """A local path to the YAML of `name_or_path`: a YAML file, a folder holding `hf_plugins_config.yaml`, or a Hub
    repo id (downloaded, or found in the local Hub cache when offline)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / CONFIG_NAME
        if not candidate.is_file():
            raise ValueError(f"{path} holds no {CONFIG_NAME}: save a config there with `save_pretrained` first.")
        return candidate
    name = str(name_or_path)
    if name.endswith((".yaml", ".yml")) or name.count("/") > 1 or name.startswith((".", "/")):
        raise ValueError(f"Config file {name!r} does not exist.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(name, CONFIG_NAME, revision=revision, cache_dir=cache_dir, token=token))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as error:
        raise ValueError(
            f"Could not get {CONFIG_NAME} of {name!r} from the Hub or its local cache ({type(error).__name__}): check "
            "the repo id, or pass a local folder or YAML file."
        ) from error


class HubConfigMixin:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for a dataclass config."""

    def to_yaml_dict(self) -> dict:
        """The fields the user changed, as plain YAML values (secrets left out).

        A field is written when its value differs from the one it takes in a config built without it: the class
        default as `__post_init__` turns it into a value (`report_to=None` into `[]`, `accelerator_config` into its
        settings, `pad_to_multiple_of="auto"` into this machine's choice), so that what the config derives on this
        machine is not pinned in the file and is derived again wherever it is loaded."""
        out = {}
        values = self._plain_values()
        baseline, passed = self._baseline_values()
        for field in dataclasses.fields(self):
            if not field.init or field.name in SECRET_FIELDS or field.name not in values:
                continue
            value = values[field.name]
            if baseline is not None and field.name not in passed:
                if value == baseline.get(field.name, dataclasses.MISSING):
                    continue
            else:
                default = _default(field)
                if default is not dataclasses.MISSING and value == _plain(default):
                    continue
            out[field.name] = value
        return out

    def _plain_values(self) -> dict:
        # `to_dict()` (transformers) turns what `__post_init__` built (enums, AcceleratorConfig) back into plain values
        values = self.to_dict() if hasattr(self, "to_dict") else dataclasses.asdict(self)
        for name in list(values):
            # `to_dict()` masks every `*_token` field; only the secrets are left out, the rest (eos_token) are kept
            values[name] = _plain(getattr(self, name) if name.endswith("_token") else values[name])
        return values

    def _baseline_values(self) -> tuple[dict | None, tuple[str, ...]]:
        """The plain values of a config of this class built with nothing but `output_dir` set, and the fields passed
        to build it (on a machine without a GPU the default precision settings fail their check: those are taken
        from this config too). The passed fields are compared with their class defaults. `(None, ())` if no config
        can be built."""
        import warnings

        for passed in (("output_dir",), ("output_dir", *_DEVICE_FIELDS)):
            kwargs = {name: getattr(self, name) for name in passed if hasattr(self, name)}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return type(self)(**kwargs)._plain_values(), passed
            except Exception:  # noqa: BLE001 - any failure: compare with the class defaults
                continue
        return None, ()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **push_kwargs) -> Path:
        """Write `hf_plugins_config.yaml` and a README stub to `save_directory` (created if needed); with
        `push_to_hub=True` also upload the folder (`push_kwargs` go to `push_to_hub`)."""
        import yaml

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        name = type(self).__name__
        header = f"# {name} for hf-plugins (load with hf_plugins.{name}.from_pretrained or `--config`)\n"
        (folder / CONFIG_NAME).write_text(header + yaml.safe_dump(self.to_yaml_dict(), sort_keys=True))
        readme = folder / "README.md"
        if not readme.exists():
            method = name[: -len("Config")] if name.endswith("Config") else name
            readme.write_text(
                f"---\nlibrary_name: hf-plugins\ntags:\n- hf-plugins\n- {method.lower()}\n---\n\n"
                f"# {method} training config\n\nA `{name}` for [hf-plugins](https://pypi.org/project/hf-plugins/).\n\n"
                "```python\n"
                f'from hf_plugins import {name}\n\nconfig = {name}.from_pretrained("<this repo>")\n```\n\n'
                f"or on the command line: `hf-plugins <method> --config <this repo> --model_name_or_path ... "
                "--dataset_name ...`\n"
            )
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or folder.name
            self._upload(folder, repo_id, **push_kwargs)
        return folder

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision=None, cache_dir=None, token=None, **overrides
    ):
        """Load a config saved with `save_pretrained` (a folder, its YAML file, or a Hub repo id; offline, repo ids
        resolve from the local Hub cache). `overrides` replace saved values."""
        data = read_config_yaml(resolve_config_file(name_or_path, revision, cache_dir, token))
        data.update(overrides)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{name_or_path} has fields that {cls.__name__} does not know: {', '.join(unknown)}. Load it with the "
                "config class of the method it was written for, or remove those fields."
            )
        return cls(**data)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None, commit_message=None):
        """Save to a temporary folder and upload it to the Hub repo `repo_id` (created if missing)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return self._upload(Path(tmp), repo_id, private=private, token=token, commit_message=commit_message)

    def _upload(self, folder: Path, repo_id: str, private=None, token=None, commit_message=None):
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or f"Upload {type(self).__name__}"
        )
