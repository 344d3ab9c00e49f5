"""Transfer2.5 inference specs (modules/spec.py): the seed document's examples, batches, messages."""

import json
from pathlib import Path

import pytest

from modules.spec import SpecError, load_specs, parse_spec, strip_jsonc

# The multicontrol example of the Transfer2.5 inference doc, comments and trailing comma included.
MULTICONTROL = """{
    // Path to the prompt file, use "prompt" to directly specify the prompt
    "prompt_path": "assets/robot_example/robot_prompt.json",

    // Directory to save the generated video
    "output_dir": "outputs/robot_multicontrol",

    // Path to the input video
    "video_path": "assets/robot_example/robot_input.mp4",

    // Inference settings:
    "guidance": 3,

    // Depth control settings
    "depth": {
        // Path to the control video
        // If a control is not provided, it will be computed on the fly.
        "control_path": "assets/robot_example/depth/robot_depth.mp4",

        // Control weight for the depth control
        "control_weight": 0.5
    },

    // Edge control settings
    "edge": {
        // Path to the control video
        "control_path": "assets/robot_example/edge/robot_edge.mp4",
        // Default control weight of 1.0 for edge control
    },

    // Seg control settings
    "seg": {
        // Path to the control video
        "control_path": "assets/robot_example/seg/robot_seg.mp4",

        // Control weight for the seg control
        "control_weight": 1.0
    },

    // Blur control settings
    "vis":{
        // Control video computed on the fly
        "control_weight": 0.5
    }
}"""

DISTILLED = """{
    "name": "robot_edge",
    "prompt_path": "/path/to/prompt/robot_prompt.txt",
    "video_path": "/path/to/input/robot_input.mp4",
    "guidance": 3,
    "num_steps": 4,
    "edge": {
        "control_path": "/path/to/edge/robot_edge.mp4",
        "control_weight": 1.0
    }
}"""

# The doc's mask example is a fragment; a prompt makes it a whole spec.
MASK = """{
    "prompt": "a robot arm",
    "depth": {
        "control_path": "assets/robot_example/depth/robot_depth.mp4",
        "mask_path": "/path/to/depth/mask.mp4",
        "control_weight": 0.5
    }
}"""


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\0\0\0 ftyp")


@pytest.fixture
def assets(tmp_path) -> Path:
    a = "assets/robot_example/"
    touch(
        tmp_path,
        a + "robot_input.mp4",
        a + "depth/robot_depth.mp4",
        a + "edge/robot_edge.mp4",
        a + "seg/robot_seg.mp4",
        "input.mp4",
    )
    (tmp_path / a / "robot_prompt.json").write_text(json.dumps({"prompt": "  A robot arm folds a towel.\n"}))
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


def problems(folder: Path, spec: dict | str, name: str = "spec.json", **kw) -> list[str]:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    with pytest.raises(SpecError) as err:
        load_specs(write(folder, name, text), **kw)
    assert str(err.value) == "\n".join(err.value.problems)
    return err.value.problems


GOOD = {"name": "robot", "prompt": "a robot", "video_path": "input.mp4", "edge": {}}


def test_multicontrol_example(assets):
    specs, failures = load_specs(write(assets, "robot_multicontrol_spec.json", MULTICONTROL))
    assert failures == [] and len(specs) == 1
    s, a = specs[0], assets / "assets/robot_example"
    assert s.name == "robot_multicontrol_spec" and s.prompt == "A robot arm folds a towel."
    assert s.guidance == 3.0 and s.num_steps == 35 and s.output_dir == assets / "outputs/robot_multicontrol"
    assert s.video_path == a / "robot_input.mp4"
    assert {k: c.control_weight for k, c in s.controls.items()} == {"depth": 0.5, "edge": 1.0, "seg": 1.0, "vis": 0.5}
    assert s.controls["depth"].control_path == a / "depth/robot_depth.mp4"
    assert s.controls["seg"].control_path == a / "seg/robot_seg.mp4"
    assert s.controls["edge"].control_path == a / "edge/robot_edge.mp4"
    assert s.controls["vis"].control_path is None and s.controls["vis"].preset_blur_strength == "medium"


def test_distilled_and_mask_examples(assets):
    touch(assets, "input/robot_input.mp4", "edge/robot_edge.mp4", "depth/mask.mp4")
    write(assets, "robot_prompt.txt", "a robot\n")
    (assets / "prompt").mkdir()
    write(assets / "prompt", "robot_prompt.txt", "a robot arm\n")
    [s], _ = load_specs(write(assets, "d.json", DISTILLED.replace("/path/to/", f"{assets}/")))
    assert s.name == "robot_edge" and s.num_steps == 4 and s.prompt == "a robot arm"
    assert s.controls["edge"].control_path == assets / "edge/robot_edge.mp4"
    [m], _ = load_specs(write(assets, "m.json", MASK.replace("/path/to/", f"{assets}/")))
    assert m.controls["depth"].mask_path == assets / "depth/mask.mp4" and m.controls["depth"].control_weight == 0.5


def test_jsonl_default_names_and_comments(assets):
    lines = [
        "// a batch",
        json.dumps(dict(GOOD, name=None)) + "  // first",
        "",
        '{"prompt": "b", "video_path": "input.mp4", "vis": {"preset_blur_strength": "low",},}',
    ]
    specs, _ = load_specs(write(assets, "batch.jsonl", "\n".join(lines)))
    assert [s.name for s in specs] == ["batch_000", "batch_001"]
    assert [s.source for s in specs] == ["batch.jsonl:2", "batch.jsonl:4"]
    assert specs[1].controls["vis"].preset_blur_strength == "low"


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"gudiance": 3}, "gudiance", "did you mean 'guidance'"),
        ({"edge": {"control_wieght": 1}}, "edge.control_wieght", "did you mean 'control_weight'"),
        ({"num_steps": "4"}, "num_steps", "expected an integer"),
        ({"guidance": True}, "guidance", "expected a number"),
        ({"guidance": 7.5}, "guidance", "between 0 and 7"),
        ({"edge": {"control_weight": 1.5}}, "edge.control_weight", "between 0 and 1"),
        ({"num_conditional_frames": 3}, "num_conditional_frames", "between 0 and 2"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"edge": {"preset_edge_threshold": "huge"}}, "edge.preset_edge_threshold", "very_low, low, medium"),
        ({"vis": {"preset_edge_threshold": "low"}}, "vis.preset_edge_threshold", "only allowed in the edge block"),
        ({"video_path": "missing.mp4"}, "video_path", "file not found"),
        ({"depth": {"control_weight": 0.5}}, "depth.control_path", "exist only for edge and vis"),
        ({"video_path": None}, "edge.control_path", "no video_path"),
        ({"name": "../robot"}, "name", "not a safe file stem"),
        ({"seg": "seg.mp4"}, "seg", "expected an object"),
        ({"resolution": "1080"}, "resolution", "480, 720"),
        ({"prompt_path": "p.txt"}, "prompt", "not both"),
    ],
)
def test_each_problem_is_named(assets, change, field, words):
    [msg] = problems(assets, {**GOOD, **change})
    spec = change.get("name", "robot")
    assert msg.startswith(f"spec {spec!r} (spec.json): field {field!r}: "), msg
    assert words in msg


def test_no_control_duplicate_names_and_many_problems(assets):
    [msg] = problems(assets, {"prompt": "x"})
    assert msg == "spec 'spec' (spec.json): needs at least one of edge, vis, depth, seg, keypoint (a control block)"
    assert load_specs(write(assets, "t2w.json", '{"prompt": "x"}'), require_control=False)[0][0].name == "t2w"
    lines = [json.dumps(GOOD), json.dumps(dict(GOOD, prompt="other"))]
    [dup] = problems(assets, "\n".join(lines), "b.jsonl")
    assert dup == "spec 'robot' (b.jsonl:2): field 'name': duplicate of the spec at b.jsonl:1"
    many = problems(assets, {"name": "r", "gudiance": 1, "num_steps": 0, "keypoint": {}, "vis": []})
    assert len(many) == 5 and all(m.startswith("spec 'r' (spec.json): ") for m in many)
    assert any("'prompt': missing" in m for m in many) and any("'keypoint.control_path'" in m for m in many)


def test_json_syntax_error_names_file_and_line(assets):
    [msg] = problems(assets, '{\n  "prompt": "x",\n  "edge": {} }\n  oops', "s.json")
    assert msg.startswith("s.json:4: invalid JSON")
    msgs = problems(assets, json.dumps(GOOD) + "\n{bad", "b.jsonl")
    assert msgs == ["b.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes"]


def test_keep_going_and_overrides(assets):
    lines = [json.dumps(GOOD), json.dumps(dict(GOOD, name="bad", guidance=9)), json.dumps(dict(GOOD, name="c"))]
    path = write(assets, "b.jsonl", "\n".join(lines))
    specs, failures = load_specs(path, keep_going=True)
    assert [s.name for s in specs] == ["robot", "c"] and len(failures) == 1 and "'bad'" in failures[0]
    with pytest.raises(SpecError, match="field 'guidance'"):
        load_specs(path)
    # the override replaces the bad guidance, and is itself checked
    specs, failures = load_specs(path, overrides={"num_steps": 4, "guidance": 0})
    assert failures == [] and [s.num_steps for s in specs] == [4, 4, 4] and specs[1].guidance == 0.0
    with pytest.raises(SpecError) as err:
        load_specs(path, overrides={"num_steps": 0})
    assert sum("field 'num_steps': must be >= 1" in p for p in err.value.problems) == 3


def test_to_json_round_trips(assets):
    [s], _ = load_specs(write(assets, "robot_multicontrol_spec.json", MULTICONTROL))
    s.resolution, s.max_frames, s.controls["edge"].preset_edge_threshold = "32x48", 9, "high"
    data = json.loads(json.dumps(s.to_json()))
    assert "prompt_path" not in data and data["edge"]["preset_edge_threshold"] == "high"
    assert parse_spec(data, Path("/elsewhere"), s.source) == s
    assert parse_spec(dict(data, resolution=480), assets, s.source).resolution == "480"


def test_strip_jsonc_keeps_strings():
    text = '{"url": "http://x/*y*/", "q": "a\\"//b", /* c, */ "l": [1, 2,], // end\n}'
    assert json.loads(strip_jsonc(text)) == {"url": "http://x/*y*/", "q": 'a"//b', "l": [1, 2]}
    assert strip_jsonc('{"a": 1, /* x\ny */ }').count("\n") == 1
