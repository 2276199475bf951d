"""Every ``training.distill``, ``training.sample`` and ``training.convert`` command of the README and the docs,
replayed as a user runs it (issue 20, "What to build" 4).

The commands are read from the Markdown (``tests/helpers/readme_commands.py``: fenced and indented blocks with
their line continuations, and inline code that gives the module arguments), not listed here, so a command added
to the documentation is replayed, or fails ``test_every_documented_command_has_a_replay`` with a message naming
what to add. Each replay (``tests/helpers/readme_replay.py``) runs in a fresh process of the project's ``.venv``
Python, nothing added to ``sys.path``, in a folder laid out like a ComfyUI install where the command's relative
paths point, on tiny models written in the same ComfyUI or diffusers layout under the same names, for 2 steps. Then:

- ``training.distill``: the LoRA it writes carries the teacher's family, and stock ComfyUI's LoraLoader path
  (``comfy.sd.load_lora_for_models`` on a ComfyUI model holding the tiny teacher's weights) patches one weight per
  LoRA module with no "lora key not loaded"; CogVideoX, which has no ComfyUI model, through ``training.sample``'s
  loader (diffusers' ``load_lora_weights``, every layer must take it);
- ``training.sample``: the animated WebP, teacher | student, with the replay's frames;
- ``training.convert``: the ComfyUI LoRA it writes, loaded by stock ComfyUI with no key skipped on the release's
  architecture (the command's ``FILE`` is a file of the release its ``--release`` names; Dreamshaper's ``.pt``
  when it names none);
- ``--help``: it lists every option of the option table (``docs/training.md``).

``accelerate launch`` lines run as written with 2 CPU processes over gloo instead of 8 GPUs (``--multi_gpu`` is
DDP, the shipped ``accelerate_fsdp2.yaml`` is FSDP2; ``tests/test_fsdp.py`` launches them the same way), with
``--config my_run.yaml`` a YAML of the SD1.5 command's model and prompts (``docs/multi_gpu.md`` says "same flags"). A
command written twice (the SD1.5 one, in the README and its guide) is replayed once.

Model files that ComfyUI's templates name in scaled fp8 are written so (Flux's T5 as t5xxl_fp8_e4m3fn_scaled, Wan's
UMT5, Qwen-Image's Qwen2.5-VL).
"""
from __future__ import annotations

import json

import pytest

from tests.helpers.readme_commands import ROOT, documented_commands
from tests.helpers.readme_replay import (
    Unmapped, Workspace, comfy_load, diffusers_load, option_table_flags, outputs_of, plan, run,
)

COMMANDS = documented_commands()
TIMES: dict[str, float] = {}
REPLAYED: dict[str, tuple[str, bool]] = {}  # command text -> (where it was first replayed, whether that passed)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, comfy):
    ws = Workspace(tmp_path_factory.mktemp("readme_replay"))
    ws.outputs = {o for c in COMMANDS for o in outputs_of(c)}
    yield ws
    print("\nreplay times: " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


def test_the_documentation_has_commands_of_each_program():
    programs = {c.program for c in COMMANDS}
    assert programs == {"distill", "sample", "convert"}, programs
    assert any(c.argv[0] == "accelerate" for c in COMMANDS)
    assert sum(c.program == "distill" for c in COMMANDS) >= 8


def test_every_documented_command_has_a_replay(workspace):
    """Each command maps onto a replay (the inputs it names have tiny stand-ins); none is left out."""
    unmapped = []
    for command in COMMANDS:
        try:
            plan(command, workspace)
        except Unmapped as err:
            unmapped.append(str(err))
    assert not unmapped, "documented commands no replay covers:\n" + "\n".join(unmapped)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_replays(command, workspace):
    if command.text in REPLAYED:  # the same command written twice (README and guide): replayed once
        assert REPLAYED[command.text][1], f"{command.source} is the command of {REPLAYED[command.text][0]}, whose replay failed"
        return
    REPLAYED[command.text] = (command.source, False)
    replay_and_check(command, workspace)
    REPLAYED[command.text] = (command.source, True)


def replay_and_check(command, workspace):
    replay = plan(command, workspace)
    process, seconds = run(replay, workspace)
    TIMES[command.id] = seconds
    printed = process.stdout + process.stderr
    assert process.returncode == 0, f"{command.source}: `{' '.join(replay.argv)}` failed:\n{printed[-5000:]}"

    if command.argv[0] == "accelerate":  # really 2 processes: DDP's identical adapters, or FSDP2's gathered shards
        assert "adapters identical on 2 process(es)" in printed or "adapters gathered from 2 FSDP2 shards" in printed, printed[-3000:]
    if "--help" in command.argv:
        flags = option_table_flags()
        assert len(flags) >= 20, f"the documentation's option table (docs/training.md) gave only {flags}"
        missing = [flag for flag in flags if flag not in process.stdout]
        assert not missing, f"--help does not list the documented options {missing}"
        return
    output = workspace.root / replay.output
    assert output.is_file(), f"{command.source} wrote no {replay.output}:\n{printed[-3000:]}"
    if command.program == "sample":
        from PIL import Image

        with Image.open(output) as webp:
            assert webp.n_frames == replay.model.num_frames and webp.size == (2 * replay.model.resolution, replay.model.resolution)
        return
    if command.program == "convert":
        skipped, patches, modules = comfy_load(replay.release.comfy_twin(replay.release_folder), output)
    else:
        from training.lora_io import read_lora

        _, info = read_lora(output)
        assert info is not None and info.base_family == replay.model.family and info.training_steps == 2
        if replay.model.comfy_twin is None:  # CogVideoX: no ComfyUI model
            assert diffusers_load(replay.model_folder, output) > 0
            return
        skipped, patches, modules = comfy_load(replay.model.comfy_twin(replay.model_folder), output)
    assert skipped == [] and patches == modules > 0, f"stock ComfyUI skipped {skipped[:3]}; {patches} patches for {modules} modules"


def test_a_command_no_replay_covers_is_found_and_fails_naming_the_fix(tmp_path, workspace):
    """Negative control: a README with three more commands, in each form the parser reads (a fenced block with a
    continuation line, an indented block, inline code), naming a model no replay builds: all three are found and
    each fails the mapping with the fix in its message."""
    from tests.helpers.readme_commands import commands_in

    readme = (tmp_path / "README.md")
    unknown = "ComfyUI/models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"
    readme.write_text(
        (ROOT / "README.md").read_text()
        + f"\n```bash\n.venv/bin/python -m training.distill --model {unknown} \\\n  --prompts prompts.txt --output a.safetensors\n```\n"
        + f"\nText.\n\n    python -m training.distill --model {unknown} --prompts prompts.txt --output b.safetensors\n"
        + f"\nOr `python -m training.sample --model {unknown} --lora a.safetensors --prompt p --output c.webp` inline.\n")
    found = commands_in(readme, tmp_path)
    added = [c for c in found if unknown in c.argv]
    assert len(found) == len([c for c in COMMANDS if c.source.startswith("README.md")]) + 3 and len(added) == 3
    assert [c.program for c in added] == ["distill", "distill", "sample"] and "--prompts" in added[0].argv
    for command in added:
        with pytest.raises(Unmapped, match=f"names '{unknown}', which no replay builds: add an entry for it to INPUTS"):
            plan(command, workspace)
