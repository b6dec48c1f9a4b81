"""The one typed schema of a run, and how it is loaded: defaults < YAML files < command line.

The config is read-only once loaded. Runtime facts (rank, device, ...) live in
`mnist_add.distributed.Runtime`, never in here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from mnist_add.files import UnreadableFile, kind_of, present, read_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user mistake in the configuration; the message says what to change."""


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A schema field whose value must lie within bounds; `validate` checks every such field."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    return field(default=default, metadata={"bounds": bounds})


class Arch(str, Enum):
    seed = "seed"  # the classroom network, exactly
    convnet = "convnet"  # the default: a small BatchNorm CNN


class Activation(str, Enum):
    relu = "relu"
    silu = "silu"  # x * sigmoid(x), smooth at 0


class Heads(str, Enum):
    joint = "joint"  # one Linear(hidden, 29) read as 10 digit + 19 sum logits (seed approach 1)
    separate = "separate"  # Linear(hidden, 10) and Linear(hidden, 19) (seed approach 2)


class SumHead(str, Enum):
    free = "free"  # learned sum logits, as in the seed
    structured = "structured"  # sum distribution = digit distribution shifted by the addend
    regression = "regression"  # one scalar regressed on the sum (seed's third attempt, loss.sum=mse)


class SumLoss(str, Enum):
    ce = "ce"
    mse = "mse"


class Precision(str, Enum):
    auto = "auto"  # bf16 on a CUDA device that supports it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(str, Enum):
    auto = "auto"  # online when credentials are available, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class DataConfig:
    root: str = "${oc.env:MNIST_ADD_DATA_ROOT,data}"  # folder holding MNIST/raw/ (torchvision's layout); the
    # environment variable MNIST_ADD_DATA_ROOT sets it for training and the tests alike
    download: bool = True  # fetch MNIST through torchvision when the files are missing
    val_samples: int = ranged(5000, ge=0, le=59_000)  # training images held out for validation, a fixed random
    # choice: best.pt and every choice read them, never the test set (0: train on all 60k, nothing to choose on)
    train_samples: int = ranged(0, ge=0, le=60_000)  # use only the first N training images not held out (0: all)
    test_samples: int = ranged(0, ge=0, le=10_000)  # evaluate on the first N test images (0: all 10k)
    augment: bool = True  # random affine on whole training batches
    max_rotation_deg: float = ranged(10.0, ge=0, le=180)
    max_shift_px: float = ranged(2.0, ge=0, le=14)
    max_scale_delta: float = ranged(0.1, ge=0, lt=1)  # scale drawn from [1 - d, 1 + d]
    max_elastic_px: float = ranged(0.0, ge=0, le=14)  # elastic warps: control-point offsets drawn from [-d, d] px
    # (0: none)
    clean_epochs: int = ranged(0, ge=0)  # the last N epochs train on unwarped images, as the test images are
    on_device: bool = True  # keep the uint8 dataset on the GPU when training on CUDA


@dataclass
class ModelConfig:
    arch: Arch = Arch.convnet
    heads: Heads = Heads.separate  # how a free sum head sits next to the digit head
    sum_head: SumHead = SumHead.structured
    width: int = ranged(32, ge=1)  # convnet: channels of the first block (doubled per block)
    hidden: int = ranged(64, ge=1)  # convnet: width of the hidden layer between the features and the heads
    activation: Activation = Activation.silu  # convnet: the nonlinearity after each BatchNorm and the hidden layer
    pool_first: bool = True  # convnet: max-pool before BatchNorm and activation in each block (a faster step)
    overlap_last_pool: bool = False  # convnet: the last block pools 3x3 windows at stride 2, covering its whole 7x7 map
    dropout: float = ranged(0.0, ge=0, lt=1)  # share of the image features zeroed in training, before the hidden layer
    addend_dim: int = ranged(0, ge=0)  # size of the learned embedding of the one-hot addend fed to the trunk (0: only a
    # structured sum head sees the addend; free and regression heads need it > 0, the seed used 20)
    channels_last: bool = True  # memory format of conv activations (faster on CPU and GPU)


@dataclass
class LossWeights:
    digit: float = ranged(1.0, ge=0)
    sum: float = ranged(1.0, ge=0)


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    sum: SumLoss = SumLoss.ce
    label_smoothing: float = ranged(0.15, ge=0, lt=1)  # digit cross-entropy, and sum cross-entropy of free heads (a structured sum
    # has -inf for impossible sums: nothing to smooth onto)


@dataclass
class OptimConfig:
    lr: float = ranged(5e-3, gt=0)  # peak learning rate of the one-cycle schedule
    weight_decay: float = ranged(1e-4, ge=0)
    warmup_fraction: float = ranged(0.2, gt=0, lt=1)  # share of the one-cycle steps spent rising to the peak
    swa_epochs: int = ranged(0, ge=0)  # the last N of trainer.epochs run at the constant swa_lr and average the
    # weights of every step (stochastic weight averaging), which then evaluate and serve; the one-cycle schedule
    # spans the epochs before them (0: no averaging)
    swa_lr: float = ranged(5e-4, gt=0)


@dataclass
class TrainerConfig:
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    epochs: int = ranged(10, ge=1, le=1_000_000)  # bounded so that seed * 1_000_003 + epoch fits a 64-bit seed
    batch_size: int = ranged(64, ge=1)  # global: summed over all ranks
    drop_last: bool = False  # leave each epoch's last, shorter global batch out (as before #33) instead of training it
    eval_batch_size: int = ranged(1000, ge=1)  # test images per evaluation batch; each rank scores whole
    # batches in turn, the same batches on any world size, so the metrics do not depend on it
    precision: Precision = Precision.auto
    num_threads: int = ranged(0, ge=0)  # torch.set_num_threads per process (0: leave torch's default)
    resume: str = "auto"  # auto (newest good checkpoint in run.dir), never, or a checkpoint path
    save_every_steps: int = ranged(0, ge=0)  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    keep_checkpoints: int = ranged(2, ge=1)  # newest step checkpoints kept; best.pt is kept apart
    log_every_steps: int = ranged(50, ge=1)
    agree_every_steps: int = ranged(16, ge=1)  # ranks agree on stop signals and divergence this often (and at
    # every log, save and evaluation); the steps between read nothing from the GPU, so it never idles
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise-reproducible runs
    compile: bool = False  # torch.compile the model for training and evaluation
    cuda_graph: str = "auto"  # on CUDA, replay each training step as a CUDA graph (mnist_add/step.py): true, false,
    # or auto: on where a GPU run has measured it faster (none has yet, so off)
    max_steps: int = ranged(0, ge=0)  # stop after this many steps in total (0: run all epochs); for tests and benches
    test_every_epoch: bool = False  # also score the test set after every epoch, for curves labelled test; never
    # used to choose anything (the test set is always scored at the end, for the final weights and best.pt)


@dataclass
class DistConfig:
    backend: str = "auto"  # nccl on CUDA, gloo on CPU
    timeout_s: int = ranged(300, ge=1)  # a collective waiting longer than this ends the job instead of hanging it


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.auto  # WANDB_MODE in the environment wins
    project: str = "mnist-add"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # default: <run.dir>/wandb
    init_timeout_s: float = ranged(30.0, gt=0)  # give up going online after this long and continue offline


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything the run writes goes here; resume=auto looks here


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_config(files: list[str] = (), overrides: list[str] = (), schema: type = Config) -> DictConfig:
    """Merge the schema's defaults, YAML `files` in order, then `key=value` overrides; validate."""
    try:
        cfg = OmegaConf.structured(schema)
        for path in files:
            cfg = _merge_file(cfg, _existing(path), schema)
        cfg = OmegaConf.merge(cfg, _from_dotlist(list(overrides)))
        # Interpolations resolve now, to values their fields accept: a bad one fails here, not mid-run.
        _resolve(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, schema)) from None
    except (ValueError, TypeError, AttributeError) as err:  # OmegaConf's own, on a key set under a list or scalar
        raise ConfigError(f"invalid config: the overrides {' '.join(map(_shown, overrides))} cannot be combined "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    check_bounds(cfg, schema)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _merge_file(cfg: DictConfig, path: Path, schema: type) -> DictConfig:
    """`cfg` with the YAML file merged over it; a value that does not fit names the file as well as the key."""
    try:
        return OmegaConf.merge(cfg, read_yaml(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_explain(err, schema)} in config file {path}") from None


def _shown(text: str, limit: int = 100) -> str:
    """A value as a one-line message quotes it: a long one cut, with its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _resolve(cfg: DictConfig) -> None:
    """OmegaConf.resolve, whose error names no key: then each value is read in turn, and the error of the one that
    fails names it (`data.root`, for an unset ${oc.env:...})."""
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError:
        _read_every_value(cfg)
        raise


def _read_every_value(node: DictConfig | ListConfig) -> None:
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        if isinstance(value := node[key], (DictConfig, ListConfig)):
            _read_every_value(value)


def _from_dotlist(overrides: list[str]) -> DictConfig:
    """`key=value` items, each value read as YAML (as OmegaConf.from_dotlist does, one item after the other), one
    line for one that is not."""
    cfg = OmegaConf.create()
    for item in overrides:
        key, _, value = item.partition("=")
        _refuse_control_characters(key, value)
        with _reading_yaml(value, f"the value of {key!r}", fix="; quote it or fix it: key=value"):
            cfg.merge_with_dotlist([item])
    return cfg


def _refuse_control_characters(key: str, value: str) -> None:
    """YAML folds a line break in a value into a space, so `run.dir=a<newline>b` would write to `a b`, a place never
    typed; no key's value holds a control character on purpose."""
    if found := _CONTROL.search(value):
        raise ConfigError(f"the value of {key!r} holds the control character {found.group()!r} (at position "
                          f"{found.start()}); remove it")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def read_yaml(path: Path) -> DictConfig:
    """The mapping in a YAML file, as it stands (no schema); ConfigError naming the file for what cannot be read."""
    try:
        text = read_text(path)
    except UnreadableFile as err:
        raise ConfigError(f"config file {err}: a config is a YAML file (UTF-8)") from None
    with _reading_yaml(text, f"config file {path}"):
        loaded = OmegaConf.load(io.StringIO(text))
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (run:, trainer:, ...), "
                          f"not a {type(loaded).__name__}")
    return loaded


@contextlib.contextmanager
def _reading_yaml(text: str, where: str, fix: str = ""):
    """Around OmegaConf's reading of the YAML `text`: what it cannot read, as one ConfigError naming `where` (the
    file, or the key of an override)."""
    _check_shape(text, where)
    try:
        yield
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}{fix}") from None
    except ValueError as err:  # Python reads at most sys.get_int_max_str_digits() (4300) digits of an integer
        if "integer string conversion" not in str(err):
            raise
        raise ConfigError(f"{where} holds a number too long to read (thousands of digits); every number of a "
                          f"config is far smaller") from None


def _check_shape(text: str, where: str) -> None:
    """Refuse, before OmegaConf reads it, YAML that would take it forever: an alias (`*name`) repeats what its anchor
    holds, so a few nested ones expand a file of a few hundred bytes into billions of values; and PyYAML's time grows
    with the square of the nesting depth. A config needs neither."""
    depth = 0
    try:
        for token in yaml.scan(text):
            if isinstance(token, yaml.AliasToken):
                raise ConfigError(f"{where} uses the YAML alias *{token.value}: aliases are not allowed, as a few can "
                                  f"expand into billions of values; write the values out")
            depth += isinstance(token, _OPENS) - isinstance(token, _CLOSES)
            if depth > _MAX_DEPTH:
                raise ConfigError(f"{where} nests lists or mappings more than {_MAX_DEPTH} deep; a config needs 3")
    except yaml.YAMLError:  # said by the reading that follows, with its line and column
        return


_MAX_DEPTH = 32
_OPENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
          yaml.FlowSequenceStartToken)
_CLOSES = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _explain(err: OmegaConfBaseException, schema: type) -> str:
    """OmegaConf's first line, the full key, and for an unknown key the closest known one."""
    message, full_key = str(err).splitlines()[0], getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) and full_key and (close := _closest_keys(full_key, schema)):
        message += f"; did you mean {' or '.join(close)}?"
    return f"invalid config: {message}" + (f" (at {full_key})" if full_key else "")


def _closest_keys(full_key: str, schema: type) -> list[str]:
    """The known key closest to an unknown one in its section; at the top, where a section was forgotten
    (`epochs=3`), every section's key of the closest name."""
    parent, _, key = full_key.rpartition(".")
    root = OmegaConf.structured(schema)
    section = OmegaConf.select(root, parent) if parent else root
    names = list(section.keys()) if isinstance(section, DictConfig) else []
    if close := difflib.get_close_matches(key, names, n=1):
        return [".".join(filter(None, [parent, close[0]]))]
    if parent:
        return []
    leaves = [(leaf, f"{name}.{leaf}") for name in names if isinstance(root[name], DictConfig) for leaf in root[name]]
    close = difflib.get_close_matches(key, sorted({leaf for leaf, _ in leaves}), n=1)
    return [full for leaf, full in leaves if close and leaf == close[0]]


def _existing(path: str) -> Path:
    """A config file as given, or by name from configs/ (`--config debug`)."""
    for candidate in (Path(path), CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if os.path.isfile(candidate):  # Path.is_file raises for a name too long
            return candidate
    if present(Path(path)):  # a folder, a FIFO, a device, a link to nothing: never opened, which could block
        raise ConfigError(f"config file {path} is {kind_of(Path(path))}; a config is a YAML file")
    raise ConfigError(f"config file {path!r} not found (looked as given and in {CONFIG_DIR})")


def check_bounds(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Every float is finite, and every `ranged` field lies within its bounds."""
    for spec in dataclasses.fields(schema):
        key, value = f"{prefix}{spec.name}", cfg[spec.name]
        if isinstance(value, DictConfig):  # a section: its own dataclass
            check_bounds(value, OmegaConf.get_type(value), f"{key}.")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if isinstance(value, int) and not -2**63 <= value < 2**63:  # what torch and the RNGs take
            raise ConfigError(f"{key} must fit in 64 bits, got {value}")
        for relation, bound in spec.metadata.get("bounds", {}).items():
            if not _BOUNDS[relation][0](value, bound):
                raise ConfigError(f"{key} must be {_BOUNDS[relation][1]} {bound}, got {value}")


_BOUNDS = {"ge": (lambda v, b: v >= b, "at least"), "gt": (lambda v, b: v > b, "greater than"),
           "le": (lambda v, b: v <= b, "at most"), "lt": (lambda v, b: v < b, "less than")}


def validate(cfg: DictConfig) -> None:
    """Checks across fields that the types alone cannot express."""
    mse, regression = cfg.loss.sum == SumLoss.mse, cfg.model.sum_head == SumHead.regression
    if mse != regression:
        raise ConfigError(
            "loss.sum=mse and model.sum_head=regression go together (MSE needs a scalar sum output): "
            "set both, or neither"
        )
    if cfg.model.addend_dim == 0 and cfg.model.sum_head != SumHead.structured:
        raise ConfigError("model.addend_dim=0 hides the addend from the network: only model.sum_head=structured "
                          "can then predict the sum; set addend_dim > 0 or sum_head=structured")
    if cfg.optim.swa_epochs >= cfg.trainer.epochs:
        raise ConfigError(f"optim.swa_epochs={cfg.optim.swa_epochs} leaves no epoch for the one-cycle schedule "
                          f"before it: make it less than trainer.epochs={cfg.trainer.epochs}")
    if cfg.data.train_samples + cfg.data.val_samples > 60_000:
        raise ConfigError(f"data.train_samples={cfg.data.train_samples} and data.val_samples={cfg.data.val_samples} "
                          f"add up to more than the 60000 training images; lower either")
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, str) and (found := _CONTROL.search(value)):
            raise ConfigError(f"{key} holds the control character {found.group()!r}, which no path or name may hold")
    if str(cfg.trainer.cuda_graph).lower() not in SWITCH:
        raise ConfigError(f"trainer.cuda_graph must be one of auto, true, false; got {cfg.trainer.cuda_graph!r}")
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"dist.backend must be one of auto, nccl, gloo; got {cfg.dist.backend!r}")


SWITCH = {"auto": None, "true": True, "false": False}  # a setting that is on, off, or decided by measurement


def switch(value: str) -> bool | None:
    """True, False, or None for auto, from a SWITCH setting (YAML's true arrives as the string "True")."""
    return SWITCH[str(value).lower()]


def refuse(message: object) -> int:
    """Say a mistake the user can fix, in one line on stderr; returns the exit code every tool gives it."""
    print(f"error: {message}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """The command lines' parser: a usage mistake reads like every other error, one line and exit 2."""

    def error(self, message: str):
        sys.exit(refuse(message))


def cli_parser(module: str, description: str) -> OneLineParser:
    """A parser whose usage names the command as it is run (`python -m mnist_add.evaluate`, not evaluate.py)."""
    return OneLineParser(prog=f"python -m {module}", description=description)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.key": value}, lists as tuples (hashable, for grouping)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def build_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The command line shared by the entry points: `[--config FILE ...] [key=value ...]`."""
    parser = cli_parser(module, description)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file merged over the defaults (repeatable; a name from configs/ works too)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, applied last")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None, module: str, description: str) -> DictConfig:
    args = build_parser(module, description).parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def training_config(cfg: DictConfig) -> DictConfig:
    """The training sections of a launcher's config (which adds its own, e.g. `job`), read-only: checkpoints,
    config.yaml and W&B then hold exactly a training config."""
    train_cfg = OmegaConf.merge(OmegaConf.structured(Config),
                                OmegaConf.masked_copy(cfg, [spec.name for spec in dataclasses.fields(Config)]))
    OmegaConf.set_readonly(train_cfg, True)
    return train_cfg


# What a config written before a key existed computed with, where that differs from the key's default today.
BEFORE_KEYS_EXISTED = {"model": {"hidden": 128, "pool_first": False, "activation": Activation.relu},
                       "data": {"val_samples": 0}, "trainer": {"drop_last": True}}


def upgraded(saved: DictConfig | dict) -> DictConfig:
    """A training config written by an older version (a config.yaml, a checkpoint's, a queued job's) under today's
    schema, read-only: a key added since takes the value the code had before it. A key since removed raises
    OmegaConfBaseException."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), BEFORE_KEYS_EXISTED, saved)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (enums as their names), for JSON, W&B and checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
