"""Typed recipes: what to quantize and how, as validated YAML that round-trips.

A recipe names the weight and activation formats and a list of *steps*, each a registered method
(``rtn`` today; transforms and searches later) applied in order, block by block::

    name: rtn-w4a16-g64
    weights: {bits: 4, symmetric: false, granularity: group, group_size: 64}
    steps:
      - method: rtn

Presets live in ``channelwise/recipes/*.yaml``; their names are part of the interface.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from channelwise.errors import RecipeError
from channelwise.quant import QuantSpec, granularity_from_name

PRESET_DIR = Path(__file__).parent / "recipes"
#: A recipe name becomes a file name (``<name>.gguf``) and a label: letters, digits, spaces and
#: ``._+-=,@``, starting with a letter or digit; never a path separator or ``..``.
NAME_PATTERN = re.compile(r"[^\W_][\w .+=,@-]{0,99}")


class QuantArgs(BaseModel):
    """One tensor kind's quantizer, as written in a recipe.

    ``granularity`` is read by role: for weights ``channel`` is per output channel; for
    activations ``channel`` is per input channel (static) and ``token`` is per token (dynamic).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8)
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "input_channel", "token", "group"] = "channel"
    group_size: int | None = Field(default=None, ge=1)
    group_along: Literal["input", "output"] = "input"
    range: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.9, gt=0, le=100)
    clip_ratio: float = Field(default=1.0, gt=0, le=1)
    scale_dtype: Literal["float32", "float16"] = "float32"
    zero_point: Literal["integer", "float"] = "integer"
    dynamic: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> QuantArgs:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. group_size: 64)")
        if self.clip_ratio != 1.0 and self.range != "minmax":
            raise ValueError(f"clip_ratio shrinks minmax ranges; range '{self.range}' clips itself")
        if self.zero_point == "float" and self.symmetric:
            raise ValueError("zero_point 'float' (a float minimum) needs symmetric: false")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(
                f"group_size is only meaningful with granularity 'group', not '{self.granularity}'"
            )
        return self

    def spec(self, role: Literal["weight", "activation"]) -> QuantSpec:
        name = self.granularity
        if role == "activation" and name == "channel":
            name = "input_channel"
        granularity = granularity_from_name(name, self.group_size, self.group_along)
        return QuantSpec(
            bits=self.bits,
            symmetric=self.symmetric,
            granularity=granularity,
            range_method=self.range,
            percentile=self.percentile,
            clip_ratio=self.clip_ratio,
            scale_dtype=self.scale_dtype,
            zero_point=self.zero_point,
        )


class AttentionArgs(BaseModel):
    """Quantizers of the attention matmul inputs; ``k``/``v`` double as the KV-cache quantizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    q: QuantArgs | None = None
    k: QuantArgs | None = None
    v: QuantArgs | None = None
    probs: QuantArgs | None = None

    @model_validator(mode="after")
    def _granularity(self) -> AttentionArgs:
        for name in ("q", "k", "v", "probs"):
            args = getattr(self, name)
            if args is not None and not args.dynamic and args.granularity != "tensor":
                raise ValueError(
                    f"attention.{name}: a static quantizer (dynamic: false) is per tensor; "
                    "set granularity: tensor, or dynamic: true"
                )
            if args is not None and args.granularity in ("channel", "input_channel"):
                raise ValueError(f"attention.{name}: use granularity token, tensor or group")
        return self

    def specs(self):
        """Fresh quantizers (a static one is calibrated per block, so never shared)."""
        from channelwise.quant.attention import AttentionQuantizers, StaticQuantizer

        def build(args: QuantArgs | None):
            if args is None:
                return None
            spec = args.spec("activation")
            return spec if args.dynamic else StaticQuantizer(spec)

        return AttentionQuantizers(**{n: build(getattr(self, n)) for n in ("q", "k", "v", "probs")})


class Step(BaseModel):
    """One method applied to every block; ``args`` are validated by the method itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    args: dict[str, Any] = Field(default_factory=dict)


class KVCacheArgs(BaseModel):
    """The KV-cache method (``kivi``, ``kv_bfp``, …) and its arguments, validated by the method
    (``channelwise.kvcache.methods``) when the recipe is planned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    args: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        bits = self.args.get("bits", self.args.get("mantissa_bits", 16))
        return f"KV{bits}" + ("bfp" if self.method == "kv_bfp" else "")


class Recipe(BaseModel):
    """A validated compression recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None
    attention: AttentionArgs | None = None
    embedding: QuantArgs | None = None  # opt-in: the token embedding (and a head tied to it)
    kv_cache: KVCacheArgs | None = None  # a compressed KV cache (channelwise.kvcache)
    steps: tuple[Step, ...] = ()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name) or ".." in name:
            raise ValueError(
                "a recipe name is 1-100 letters, digits, spaces and . _ + - = , @ starting with a "
                "letter or digit, without '..' (it names output files)"
            )
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        emb = self.embedding
        if emb is not None and (
            emb.granularity not in ("channel", "group") or emb.group_along != "input"
        ):
            raise ValueError(
                "embedding: use granularity 'channel' (one scale per token row) or 'group' "
                "(groups along the row): a lookup dequantizes single rows"
            )
        acts = self.activations
        if acts is not None:
            if acts.granularity == "token" and not acts.dynamic:
                raise ValueError(
                    "activations: per-token granularity is computed at run time; "
                    "set dynamic: true (or use tensor/channel for static)"
                )
            if acts.group_along == "output" and acts.granularity == "group":
                raise ValueError("activations: groups run along the input channels only")
        if self.weights is not None and self.weights.granularity == "token":
            raise ValueError(
                "weights: 'token' is an activation granularity; use channel, "
                "input_channel, group or tensor"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        """Weights with no steps are quantized round-to-nearest."""
        if isinstance(data, dict) and data.get("weights") is not None and not data.get("steps"):
            return {**data, "steps": (Step(method="rtn"),)}
        return data

    @property
    def is_float(self) -> bool:
        return (
            self.weights is None
            and self.activations is None
            and self.attention is None
            and self.embedding is None
            and self.kv_cache is None
            and not self.steps
        )

    def bits_label(self) -> str:
        if self.is_float:
            return "float"
        w = f"W{self.weights.bits}" if self.weights else "W16"
        a = f"A{self.activations.bits}" if self.activations else "A16"
        g = f" g{self.weights.group_size}" if self.weights and self.weights.group_size else ""
        kv = ""
        if self.attention is not None and self.attention.k is not None:
            kv = f"KV{self.attention.k.bits}"
        if self.kv_cache is not None:
            kv = self.kv_cache.label()
        e = f" E{self.embedding.bits}" if self.embedding is not None else ""
        return f"{w}{a}{kv}{g}{e}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(
                f"{origin}: expected a mapping with keys name, weights, "
                f"activations, steps; got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{origin}: {_first_problem(exc)}") from None

    @classmethod
    def from_yaml(cls, text: str, origin: str = "recipe") -> Recipe:
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
        except yaml.MarkedYAMLError as exc:
            where = f", line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
            problem = exc.problem or exc.context or "malformed"
            raise RecipeError(f"{origin}: not valid YAML ({problem}{where})") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{origin}: not valid YAML ({exc})".replace("\n", " ")) from None
        return cls.from_dict(data, origin)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last, so a recipe with two ``weights:`` would silently quantize with the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _first_problem(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "recipe"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list | tuple) else ""
        problems.append(f"{where}: {message}{shown}")
    return "; ".join(problems)


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | Recipe | dict) -> Recipe:
    """A preset by name, a YAML file path, a mapping (as a YAML file would hold), or a
    ``Recipe`` passed through."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return Recipe.from_dict({"name": "recipe", **name_or_path}, origin="recipe mapping")
    if not isinstance(name_or_path, str | Path):
        raise RecipeError(
            f"a recipe is a preset name, a YAML file path, a mapping or a Recipe; got "
            f"{type(name_or_path).__name__}"
        )
    named = NAME_PATTERN.fullmatch(str(name_or_path)) is not None
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    path = preset if named and preset.is_file() else Path(name_or_path).expanduser()
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            raise RecipeError(f"recipe file {path} not found")
        raise RecipeError(
            f"unknown recipe '{name_or_path}': not a preset "
            f"({', '.join(preset_names())}) nor a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {path} is unreadable as UTF-8 text ({exc})") from None
    return Recipe.from_yaml(text, origin=str(name_or_path))
