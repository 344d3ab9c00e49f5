"""Inference specs in Cosmos-Transfer2.5's JSON form: parsing, checking and resolving.

`vidistill infer -i SPEC.json|SPECS.jsonl` reads its work from these files. A `.json` file holds
one spec object (or a list of them), a `.jsonl` file one spec per line; both may carry `//` and
`/* */` comments and trailing commas, as the Transfer2.5 examples do. Every spec is checked in
full before anything runs, and each problem becomes one line naming the spec, its source, the
field and what is wrong, so a whole batch can be fixed from one report.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_MODALITIES = ("edge", "vis", "depth", "seg", "keypoint")
MODALITY_NAMES = {"edge": "edge", "vis": "blur", "depth": "depth", "seg": "seg", "keypoint": "keypoint"}
EDGE_PRESETS = ("very_low", "low", "medium", "high", "very_high")
BLUR_PRESETS = ("very_low", "low", "medium", "high", "very_high")
DEFAULT_NEGATIVE_PROMPT = (
    "A blurry, ugly, distorted video of low quality: smeared details, compression artifacts, flicker, "
    "jittery or unnatural motion, warped objects and bodies, washed-out or oversaturated colors."
)
RESOLUTIONS = ("480", "720")

# Only these two are computed from the input video (datamodules/controls.py); the others need a file.
_PRESETS = {"edge": ("preset_edge_threshold", EDGE_PRESETS), "vis": ("preset_blur_strength", BLUR_PRESETS)}
_CONTROL_KEYS = ("control_path", "control_weight", "mask_path")
_TOP_KEYS = (
    "name",
    "prompt",
    "prompt_path",
    "negative_prompt",
    "seed",
    "guidance",
    "video_path",
    "max_frames",
    "num_conditional_frames",
    "resolution",
    "num_video_frames_per_chunk",
    "num_steps",
    "show_control_condition",
    "show_input",
    "keep_input_resolution",
    "output_dir",
) + SPEC_MODALITIES
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MISSING = object()


@dataclass
class ControlSpec:
    """One control block of a spec (`"edge": {...}`)."""

    control_path: Path | None = None
    """Control video; None: computed on the fly from the input video (edge, vis only)."""
    control_weight: float = 1.0
    mask_path: Path | None = None
    """Binary spatiotemporal mask video; white = the control applies there."""
    preset_edge_threshold: str = "medium"
    preset_blur_strength: str = "medium"


@dataclass
class Spec:
    """One resolved, checked spec: paths absolute, prompt read, defaults filled in.

    The defaults are Transfer2.5's and are written only here (and in ControlSpec): parse_spec
    fills missing fields from them and the pipeline compares against them (Spec.num_steps)."""

    name: str
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 1
    guidance: float = 3.0
    video_path: Path | None = None
    max_frames: int | None = None
    num_conditional_frames: int = 1
    resolution: str = "720"
    num_video_frames_per_chunk: int = 93
    num_steps: int = 35
    show_control_condition: bool = False
    show_input: bool = False
    keep_input_resolution: bool = True
    controls: dict[str, ControlSpec] = field(default_factory=dict)
    output_dir: Path | None = None
    source: str = ""

    def to_json(self) -> dict:
        """The resolved spec in the file format (absolute paths, the prompt inline, no nulls): what
        an output's record stores, and what parse_spec turns back into an equal Spec."""
        out: dict[str, Any] = {}
        for key in _TOP_KEYS:
            value = getattr(self, key, None)  # prompt_path and the control keys are no attributes
            if value is not None:
                out[key] = str(value) if isinstance(value, Path) else value
        for key, c in self.controls.items():
            block: dict[str, Any] = {"control_weight": c.control_weight}
            for k in ("control_path", "mask_path"):
                if getattr(c, k) is not None:
                    block[k] = str(getattr(c, k))
            if key in _PRESETS:
                block[_PRESETS[key][0]] = getattr(c, _PRESETS[key][0])
            out[key] = block
        return out


class SpecError(ValueError):
    """Invalid spec(s): `problems` holds one full line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# A string literal (kept whole, so "http://x" survives), a comment, or a comma whose next
# non-blank, non-comment character closes an object or array.
_JSONC = re.compile(
    r'("(?:\\.|[^"\\\n])*")|//[^\n]*|/\*[\s\S]*?(?:\*/|$)'
    r"|,(?=(?:\s|//[^\n]*\n|/\*(?:[^*]|\*(?!/))*\*/)*[}\]])"
)


def strip_jsonc(text: str) -> str:
    """JSON-with-comments to JSON: drop `//` and `/* */` comments outside strings and commas that
    directly precede `}` or `]`. Newlines are kept, so JSON error line numbers still match the file."""

    def keep(m: re.Match) -> str:
        return m.group(1) or "\n" * m.group(0).count("\n")

    return _JSONC.sub(keep, text)


_KINDS = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _show(value: Any) -> str:
    """A value as it reads in JSON, cut short for one-line messages."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Reads typed fields of one spec, collecting every problem instead of stopping at the first."""

    def __init__(self, label: str, base_dir: Path):
        self.label, self.base_dir, self.problems = label, base_dir, []

    def fail(self, key: str | None, message: str) -> None:
        where = f"field {key!r}: " if key else ""
        self.problems.append(f"{self.label}: {where}{message}")

    def unknown(self, key: str, shown: str, allowed: tuple[str, ...]) -> None:
        close = difflib.get_close_matches(key, allowed, n=1)
        self.fail(
            shown, "unknown key" + (f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})")
        )

    def get(
        self, obj: dict, key: str, where: str, default: Any, kinds: tuple, expected: str, nullable: bool = False
    ) -> Any:
        value = obj.get(key, _MISSING)
        if value is _MISSING or (value is None and nullable):
            return default
        # bool is an int subclass in Python; a JSON true is never meant as a number.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.fail(where + key, f"expected {expected}, got {_KINDS.get(type(value), 'value')} {_show(value)}")
            return default
        return value

    def integer(self, obj, key, default, lo=1, hi=None, where="", nullable=False):
        value = self.get(obj, key, where, default, (int,), "an integer", nullable)
        return self._range(key, where, value, lo, hi, default)

    def number(self, obj, key, default, lo, hi, where=""):
        value = self.get(obj, key, where, default, (int, float), "a number")
        return float(self._range(key, where, value, lo, hi, default))

    def _range(self, key, where, value, lo, hi, default):
        if value is None:
            return value
        if hi is None and not value >= lo:
            self.fail(where + key, f"must be >= {lo}, got {_show(value)}")
        elif hi is not None and not lo <= value <= hi:  # `not` so that NaN fails too
            self.fail(where + key, f"must be between {lo} and {hi}, got {_show(value)}")
        else:
            return value
        return default

    def boolean(self, obj, key, default):
        return self.get(obj, key, "", default, (bool,), "true or false")

    def string(self, obj, key, default, where="", nullable=False):
        return self.get(obj, key, where, default, (str,), "a string", nullable)

    def choice(self, obj, key, default, allowed, where=""):
        value = self.string(obj, key, default, where)
        if value not in allowed:
            self.fail(where + key, f"unknown preset {value!r} (choose from {', '.join(allowed)})")
            return default
        return value

    def path(self, obj, key, where="", must_exist=True) -> Path | None:
        value = self.string(obj, key, None, where, nullable=True)
        if value is None:
            return None
        path = Path(os.path.abspath(self.base_dir / Path(value).expanduser()))
        if must_exist and not path.is_file():
            self.fail(where + key, f"file not found: {path}")
            return None
        return path


def _default_name(source: str, index: int) -> str:
    """A single spec file names its spec after itself; a spec of a batch ("f.jsonl:3", "f.json[2]")
    after the file and its position."""
    m = re.fullmatch(r"(.*?)(?::\d+|\[\d+\])", source)
    stem = Path(m.group(1) if m else source).stem or "spec"
    return f"{stem}_{index:03d}" if m else stem


def _read_prompt(c: _Checker, path: Path) -> str | None:
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            text = data.get("prompt") if isinstance(data, dict) else data
            if not isinstance(text, str):
                c.fail("prompt_path", f'{path}: expected a JSON string or {{"prompt": "..."}}')
                return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        c.fail("prompt_path", f"cannot read {path}: {err}")
        return None
    return text.strip()


def parse_spec(
    obj: dict,
    base_dir: Path,
    source: str,
    index: int = 0,
    require_control: bool = True,
    annotated: tuple[str, ...] = (),
) -> Spec:
    """Check one spec object and resolve it (paths against `base_dir`, the prompt file read).

    `source` says where it came from ("specs.jsonl:3"); with `index` it gives the default name.
    `annotated`: spec control keys an annotator hook computes from the video (no control_path needed).
    Raises SpecError listing every problem of this spec.
    """
    if not isinstance(obj, dict):
        raise SpecError(f"{source}: a spec must be a JSON object, got {_KINDS.get(type(obj), 'value')}")
    default = _default_name(source, index)
    name = obj.get("name") if isinstance(obj.get("name"), str) else default
    c = _Checker(f"spec {name!r} ({source})", Path(os.path.abspath(Path(base_dir).expanduser())))
    _check_top_keys(c, obj)
    spec = _top_fields(c, obj, source, default)
    for key in SPEC_MODALITIES:
        if key in obj:
            control = _control_block(c, obj, key, annotated)
            if control is not None:
                spec.controls[key] = control
    if require_control and not any(k in obj for k in SPEC_MODALITIES):
        c.fail(None, f"needs at least one of {', '.join(SPEC_MODALITIES)} (a control block)")
    if c.problems:
        raise SpecError(c.problems)
    return spec


def _check_top_keys(c: _Checker, obj: dict) -> None:
    for key in obj:
        if key not in _TOP_KEYS and isinstance(obj[key], dict):  # a control block of another modality
            c.fail(key, f"unknown control modality (choose from {', '.join(SPEC_MODALITIES)})")
        elif key not in _TOP_KEYS:
            c.unknown(key, key, _TOP_KEYS)


def _checked_name(c: _Checker, obj: dict, default: str) -> str:
    name = c.string(obj, "name", default, nullable=True)
    if not _SAFE_NAME.fullmatch(name) or set(name) == {"."}:
        c.fail("name", f"{name!r} is not a safe file stem (letters, digits, '_', '-', '.'; no path separators)")
    return name


def _checked_prompt(c: _Checker, obj: dict) -> str | None:
    """`prompt` or the text of `prompt_path`, exactly one of them."""
    prompt = c.string(obj, "prompt", None, nullable=True)
    if "prompt_path" in obj and obj["prompt_path"] is not None:
        if prompt is not None:
            c.fail("prompt", "give prompt or prompt_path, not both")
        elif (path := c.path(obj, "prompt_path")) is not None:
            prompt = _read_prompt(c, path)
    elif prompt is None and obj.get("prompt") is None:
        c.fail("prompt", "missing: give prompt or prompt_path")
    if prompt is not None and not prompt.strip():
        c.fail("prompt", "is empty")
    return prompt


def _checked_resolution(c: _Checker, obj: dict) -> str:
    resolution = str(c.get(obj, "resolution", "", Spec.resolution, (int, str), '480, 720 or a "HxW" string'))
    # HxW is for small test models (modules/pipeline.py generation_size); 480/720 pick Cosmos buckets.
    if resolution not in RESOLUTIONS and not re.fullmatch(r"[1-9]\d*x[1-9]\d*", resolution):
        c.fail("resolution", f'must be 480, 720 or "HxW", got {_show(obj.get("resolution"))}')
        return Spec.resolution
    return resolution


def _top_fields(c: _Checker, obj: dict, source: str, default_name: str) -> Spec:
    """The spec's own fields (no control blocks); a missing or invalid one takes Spec's default.
    The checks run in the file format's key order, which is the order of the problems listed."""
    name = _checked_name(c, obj, default_name)
    prompt = _checked_prompt(c, obj)
    resolution = _checked_resolution(c, obj)
    return Spec(
        name=name,
        prompt=prompt or "",
        source=source,
        resolution=resolution,
        negative_prompt=c.string(obj, "negative_prompt", Spec.negative_prompt),
        seed=c.integer(obj, "seed", Spec.seed, lo=0),
        guidance=c.number(obj, "guidance", Spec.guidance, 0, 7),
        video_path=c.path(obj, "video_path"),
        max_frames=c.integer(obj, "max_frames", Spec.max_frames, nullable=True),
        num_conditional_frames=c.integer(obj, "num_conditional_frames", Spec.num_conditional_frames, 0, 2),
        num_video_frames_per_chunk=c.integer(obj, "num_video_frames_per_chunk", Spec.num_video_frames_per_chunk),
        num_steps=c.integer(obj, "num_steps", Spec.num_steps),
        show_control_condition=c.boolean(obj, "show_control_condition", Spec.show_control_condition),
        show_input=c.boolean(obj, "show_input", Spec.show_input),
        keep_input_resolution=c.boolean(obj, "keep_input_resolution", Spec.keep_input_resolution),
        output_dir=c.path(obj, "output_dir", must_exist=False),
    )


def _control_block(c: _Checker, obj: dict, key: str, annotated: tuple[str, ...]) -> ControlSpec | None:
    """The `key` control block of a spec; None when it is no object. A control without a
    control_path must be one the pipeline can compute from the spec's input video."""
    block = obj[key]
    if not isinstance(block, dict):
        c.fail(key, f"expected an object (a control block), got {_KINDS.get(type(block), 'value')} {_show(block)}")
        return None
    where, preset = key + ".", _PRESETS.get(key)
    allowed = _CONTROL_KEYS + ((preset[0],) if preset else ())
    for k in block:
        owner = [m for m, (pk, _) in _PRESETS.items() if pk == k]
        if owner and k not in allowed:
            c.fail(where + k, f"only allowed in the {owner[0]} block")
        elif k not in allowed:
            c.unknown(k, where + k, allowed)
    control = ControlSpec(
        control_path=c.path(block, "control_path", where),
        control_weight=c.number(block, "control_weight", ControlSpec.control_weight, 0, 1, where),
        mask_path=c.path(block, "mask_path", where),
    )
    if preset:
        setattr(control, preset[0], c.choice(block, preset[0], getattr(ControlSpec, preset[0]), preset[1], where))
    if block.get("control_path") is None:
        if not preset and key not in annotated:
            c.fail(
                where + "control_path",
                f"missing: computed controls exist only for edge and vis "
                f"(or with an annotator hook, infer --annotator); give a {key} "
                "control video",
            )
        elif obj.get("video_path") is None:
            c.fail(where + "control_path", f"missing, and no video_path to compute the {key} control from")
    return control


def load_specs(
    path: str | Path,
    keep_going: bool = False,
    require_control: bool = True,
    overrides: dict | None = None,
    annotated: tuple[str, ...] = (),
) -> tuple[list[Spec], list[str]]:
    """Read, check and resolve the specs of a `.json` (one spec or a list) or `.jsonl` file.

    `overrides` (CLI flags such as {"num_steps": 4}) replace those keys in every spec before it is
    checked. Returns (valid specs, failure messages); without `keep_going` any failure raises
    SpecError with the failures of all specs, so the caller does no work on a bad batch.
    """
    path = Path(path).expanduser()
    entries: list[tuple[int, Any, str]] = []
    failures: list[str] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        failures.append(f"{path}: cannot read the spec file: {getattr(err, 'strerror', None) or err}")
        text = None
    if text is not None and path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            line = strip_jsonc(line).strip()
            if not line:
                continue
            src = f"{path.name}:{lineno}"
            try:
                entries.append((len(entries), json.loads(line), src))
            except json.JSONDecodeError as err:
                failures.append(f"{src}: invalid JSON: {err.msg}")
                entries.append((len(entries), _MISSING, src))  # keeps the later specs' default names stable
    elif text is not None:
        try:
            data = json.loads(strip_jsonc(text))
        except json.JSONDecodeError as err:
            failures.append(f"{path.name}:{err.lineno}: invalid JSON: {err.msg}")
        else:
            if isinstance(data, list):
                entries = [(i, d, f"{path.name}[{i}]") for i, d in enumerate(data)]
            else:
                entries = [(0, data, path.name)]
    if text is not None and not entries and not failures:
        failures.append(f"{path.name}: no specs in the file")

    specs: list[Spec] = []
    seen: dict[str, str] = {}
    for index, obj, src in entries:
        if obj is _MISSING:
            continue
        if isinstance(obj, dict) and overrides:
            obj = {**obj, **overrides}
        try:
            spec, problems = parse_spec(obj, path.parent, src, index, require_control, annotated), []
        except SpecError as err:
            spec, problems = None, err.problems
        raw = obj.get("name") if isinstance(obj, dict) else None
        name = raw if isinstance(raw, str) else _default_name(src, index)
        if name in seen:
            problems = problems + [f"spec {name!r} ({src}): field 'name': duplicate of the spec at {seen[name]}"]
        else:
            seen[name] = src
        if problems:
            failures.extend(problems)
        else:
            specs.append(spec)
    if failures and not keep_going:
        raise SpecError(failures)
    return specs, failures
