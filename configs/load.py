"""Resolve a recipe: YAML file (with `extends:`) + dotted `key=value` overrides -> GRPOConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from configs.schema import GRPOConfig

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config problem, said in one line that names the input and the fix."""


def recipe_names() -> list[str]:
    """Every runnable recipe: the YAML files here not starting with `_` (those are shared bases)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML path or one of: {', '.join(recipe_names())}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently: a second `actor:` section would drop the whole first one)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice in one mapping: keep one", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML (safe loader, a key given twice refused) and merge it over the file named by
    its `extends:` key."""
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; give a recipe's YAML file")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # PyYAML's position of the problem, 0-based
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({what}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml(_extends_path(path, parent), seen + (path,))
    return _deep_merge(base, data)


def _extends_path(path: Path, parent: Any) -> Path:
    """The file `extends: <parent>` of recipe `path` names: relative to the recipe's folder, else a
    file of ours in configs/ (`tiny-cpu`, `tiny-cpu.yaml`, `_lora.yaml`), so a recipe of your own
    anywhere may extend ours. A missing one is one line naming both paths and the fix."""
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: `extends: {parent}` must be a YAML file name (e.g. `extends: tiny-cpu.yaml`)")
    here = (path.parent / parent).resolve()
    if here.is_file():
        return here
    ours = CONFIG_DIR / (parent if Path(parent).suffix in (".yaml", ".yml") else f"{parent}.yaml")
    if Path(parent).name == parent and ours.is_file():
        return ours
    bases = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"{path}: `extends: {parent}` names a missing file ({here}); give a path relative to {path.parent}, "
        f"or a file of configs/ ({', '.join(bases)})"
    )


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`actor.lr=1e-5 rollout.n=4` -> nested dict; values are parsed as YAML scalars. A key given
    twice, or a key and a key under it (`data=...` beside `data.dir=...`), is one error: which one
    was meant is not for us to guess (code that composes overrides on purpose uses `with_overrides`)."""
    tree: dict[str, Any] = {}
    given: dict[str, str] = {}  # dotted key -> its raw value, as typed
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        if key in given:
            raise ConfigError(f"{key} given twice ({given[key]}, {raw}): give it once")
        clash = next((k for k in given if k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise ConfigError(f"override '{item}' conflicts with '{clash}={given[clash]}': give one of them")
        given[key] = raw
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            why = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(
                f"override '{item}': its value is not valid YAML ({why}); fix it, or quote a string "
                f"that holds YAML's special characters"
            ) from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def with_overrides(base: Iterable[str], over: Iterable[str]) -> list[str]:
    """`base` less the keys that `over` gives, then `over`: for code that layers overrides on purpose
    (an eval's recorded settings under the user's, a forced key over both), where the later must win."""
    over = list(over)
    keys = {item.partition("=")[0].strip() for item in over}
    return [item for item in base if item.partition("=")[0].strip() not in keys] + over


VERL_PREFIX = "actor_rollout_ref."
"""verl nests actor, rollout, ref and model under this; here they are top-level sections."""

VERL_NAMES = {
    "actor.optim.lr": "actor.lr",
    "actor.optim.lr_warmup_steps": "actor.lr_warmup_steps",
    "actor.optim.lr_warmup_steps_ratio": "actor.lr_warmup_steps_ratio",
    "actor.optim.weight_decay": "actor.weight_decay",
    "actor.optim.betas": "actor.betas",
    "actor.fsdp_config.param_offload": "actor.param_offload",
    "actor.fsdp_config.optimizer_offload": "actor.optimizer_offload",
    "ref.fsdp_config.param_offload": "actor.param_offload, which offloads the reference too",
    "algorithm.kl_ctrl.kl_coef": "actor.kl_loss_coef; verl's kl_ctrl weighs a KL in the reward, which this "
    "build does not support: GRPO puts the KL in the loss",
    "algorithm.kl_ctrl.type": "actor.kl_loss_type; the KL is in the loss here, not in the reward",
    "custom_reward_function.path": "reward.function, as 'package.module:function'",
    "custom_reward_function.name": "reward.function, as 'package.module:function'",
    "trainer.project_name": "tracking.experiment",
    "trainer.experiment_name": "tracking.run_name",
    "data.train_files": "data.source (a hub id, or a directory with train/test jsonl or parquet)",
    "data.val_files": "data.source (a hub id, or a directory with train/test jsonl or parquet)",
}
"""verl config names whose key differs here -> ours (with a note where the meaning differs)."""


def _leaves(prefix: str, value: Any) -> list[str]:
    """Dotted keys of every leaf under `prefix` (an unknown key's input may be a whole subtree)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [prefix]


def _our_name(key: str) -> str | None:
    """The key of this schema that verl's `key` is, or None."""
    bare = key.removeprefix(VERL_PREFIX)
    if bare in VERL_NAMES:
        return VERL_NAMES[bare]
    if bare != key and _schema_field(tuple(bare.split("."))) is not None:
        return bare
    return None


def _unknown_key(key: str, value: Any) -> str:
    """An unknown key (its value may be a subtree): each leaf that is a verl name gets ours; the
    rest is named once, as the key, or leaf by leaf under verl's actor_rollout_ref."""
    named = {leaf: _our_name(leaf) for leaf in _leaves(key, value)}
    out = [f"unknown key '{leaf}' (verl's name; here: {ours})" for leaf, ours in named.items() if ours]
    rest = [leaf for leaf, ours in named.items() if not ours]
    if (key + ".").startswith(VERL_PREFIX):
        out += [
            f"unknown key '{leaf}' (verl's actor_rollout_ref.X is X here, but {leaf.removeprefix(VERL_PREFIX)} "
            "is no key either; see configs/schema.py)"
            for leaf in rest
        ]
    elif rest:
        out.append(f"unknown key '{key}' (check the spelling; see configs/schema.py)")
    return "; ".join(out)


def _schema_field(loc: tuple) -> Any:
    """The pydantic FieldInfo at a dotted location of GRPOConfig, or None."""
    model, info = GRPOConfig, None
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return None
        model = info.annotation
    return info


def _minus_one_meaning(loc: tuple) -> str | None:
    """What -1 means for a field declared with configs.schema._minus_one_means, else None."""
    info = _schema_field(loc)
    extra = getattr(info, "json_schema_extra", None)
    return extra.get("minus_one") if isinstance(extra, dict) else None


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key(key, e.get("input")))
        elif e["type"] == "literal_error":
            lines.append(f"{key}={e.get('input')} is not supported in this build (choose {e['ctx']['expected']})")
        elif e["type"] == "value_error":
            lines.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "greater_than_equal" and (meaning := _minus_one_meaning(e["loc"])):
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r}); -1 means {meaning}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"invalid config {source}: " + "; ".join(lines))


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> GRPOConfig:
    path = _resolve_path(name_or_path)
    overrides = list(overrides)
    data = _deep_merge(_read_yaml(path), parse_overrides(overrides))
    data.setdefault("recipe", path.stem)
    source = str(path) + (f" with {' '.join(overrides)}" if overrides else "")
    try:
        return GRPOConfig.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source) from None


def flatten(cfg: GRPOConfig) -> dict[str, str]:
    """Dotted keys -> strings, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return out
