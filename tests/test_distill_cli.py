"""The command line: --help, config files with flag overrides, and bad inputs that fail before any
heavy work with a message naming the fix and nothing written."""
from __future__ import annotations

import sys

import pytest

from training.config import OPTION_NAMES, DistillConfig, build_parser, parse_config
from training.distill import EXIT_BAD_INPUT, main


@pytest.fixture
def paths(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog\n")
    model = tmp_path / "model"
    model.mkdir()
    return {"model": model, "prompts": prompts, "output": tmp_path / "loras" / "tdm.safetensors", "root": tmp_path}


def base_args(paths, **overrides):
    args = {"--model": paths["model"], "--prompts": paths["prompts"], "--output": paths["output"]}
    args.update(overrides)
    return [str(x) for pair in args.items() for x in pair]


def test_help_explains_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in OPTION_NAMES:
        assert "--" + name.replace("_", "-") in text
    assert "(default: 900)" in text and "(default: 2.0)" in text and "(default: 4)" in text
    required = ("model", "prompts", "output")
    assert text.count("(default:") == len(OPTION_NAMES) - len(required) and text.count("(required)") == len(required)


def test_config_file_then_flags_override(paths, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {paths['model']}\nprompts: {paths['prompts']}\noutput: {paths['output']}\n"
                         "num-steps: 2\ncfg: 4.5\nrandmid: true\n")
    cfg = parse_config(["--config", str(yaml_file), "--cfg", "3"])
    assert (cfg.num_steps, cfg.cfg, cfg.randmid, cfg.total_steps) == (2, 3.0, True, 900)
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(f'model = "{paths["model"]}"\nprompts = "{paths["prompts"]}"\noutput = "{paths["output"]}"\n'
                         'distance = "l2"\nlora_rank = 8\n')
    cfg = parse_config(["--config", str(toml_file), "--no-randmid", "--grid", "999,856,665,399"])
    assert (cfg.distance, cfg.lora_rank, cfg.randmid) == ("l2", 8, False)
    assert cfg.trajectory_grid() == [999, 856, 665, 399] and cfg.num_steps == 4
    assert DistillConfig(num_steps=4).trajectory_grid() == [899, 674, 449, 224]
    assert cfg.student_lr() == pytest.approx(cfg.fake_lr() / 5)


def test_default_learning_rates_follow_rank_and_alpha(paths):
    # lr = 4e-3 sqrt(r) / alpha keeps the LoRA's relative step fixed; 1e-3 at rank = alpha = 16 (the defaults)
    base = ["--model", str(paths["model"]), "--prompts", str(paths["prompts"]), "--output", str(paths["output"])]
    cfg = parse_config(base)
    assert (cfg.lora_rank, cfg.alpha(), cfg.batch_size) == (16, 16.0, 8)
    assert cfg.fake_lr() == pytest.approx(1e-3) and cfg.student_lr() == pytest.approx(2e-4)
    assert parse_config(base + ["--lora-rank", "64"]).fake_lr() == pytest.approx(5e-4)
    assert parse_config(base + ["--lora-rank", "16", "--lora-alpha", "32"]).fake_lr() == pytest.approx(5e-4)
    explicit = parse_config(base + ["--learning-rate", "3e-4", "--lora-rank", "64"])
    assert explicit.fake_lr() == pytest.approx(3e-4) and explicit.student_lr() == pytest.approx(6e-5)


def test_jsonl_prompts_are_read(paths, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "seed": 3}\n')
    from training.config import read_prompts

    assert read_prompts(str(prompts)) == ["a cat", "a dog"]


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    # case -> (how to break the arguments, expected words of the message)
    "missing_model": (lambda p: {"--model": p["root"] / "nope"}, "does not exist"),
    "unknown_architecture_folder": (lambda p: {}, "is not a model folder this trainer knows"),
    "unreadable_checkpoint": (lambda p: {"--model": write(p["root"] / "bad.safetensors", "not safetensors")}, "cannot read"),
    "empty_prompts": (lambda p: {"--prompts": write(p["root"] / "empty.txt", "\n  \n")}, "is empty"),
    "missing_prompts": (lambda p: {"--prompts": p["root"] / "none.txt"}, "prompt file"),
    "bad_jsonl": (lambda p: {"--prompts": write(p["root"] / "p.jsonl", "{\"text\": 1}\n")}, "\"prompt\" field"),
    "k_too_large": (lambda p: {"--num-steps": 9}, "outside 1..8"),
    "k_zero": (lambda p: {"--num-steps": 0}, "outside 1..8"),
    "grid_increasing": (lambda p: {"--grid": "200,400"}, "strictly decreasing"),
    "grid_not_numbers": (lambda p: {"--grid": "a,b"}, "not numbers"),
    "grid_out_of_range": (lambda p: {"--grid": "1200,500"}, "outside 0..999"),
    "cfg_below_one": (lambda p: {"--cfg": 0.5}, "--cfg 0.5 must be at least 1"),
    "batch_zero": (lambda p: {"--batch-size": 0}, "--batch-size 0"),
    "rank_zero": (lambda p: {"--lora-rank": 0}, "--lora-rank 0"),
    "unknown_distance": (lambda p: {"--distance": "l1"}, "unknown --distance 'l1'"),
    "unknown_interval_mode": (lambda p: {"--interval-mode": "both"}, "unknown --interval-mode"),
    "unknown_fake_score_weighting": (lambda p: {"--fake-score-weighting": "snr"}, "unknown --fake-score-weighting 'snr'"),
    "fake_score_updates_zero": (lambda p: {"--fake-score-updates": 0}, "--fake-score-updates 0 must be at least 1"),
    "unknown_fake_score_rollouts": (lambda p: {"--fake-score-rollouts": "new"}, "unknown --fake-score-rollouts 'new'"),
    "fresh_rollouts_with_one_update": (lambda p: {"--fake-score-rollouts": "fresh", "--fake-score-updates": 1}, "has no effect with --fake-score-updates 1"),
    "student_ema_one": (lambda p: {"--student-ema": 1}, "--student-ema 1 must be at least 0 (off) and below 1"),
    "student_ema_negative": (lambda p: {"--student-ema": -0.1}, "--student-ema -0.1 must be at least 0 (off) and below 1"),
    "huber_c_with_l2": (lambda p: {"--huber-c": 0.01}, "--huber-c 0.01 has no effect with --distance l2"),
    "bad_resolution": (lambda p: {"--resolution": 100}, "multiple of 8"),
    "negative_lr": (lambda p: {"--learning-rate": -1}, "--learning-rate -1.0 must be positive"),
    "bad_mixed_precision": (lambda p: {"--mixed-precision": "fp8"}, "unknown --mixed-precision"),
    "total_steps_too_small": (lambda p: {"--total-steps": 50}, "too small"),
    "output_not_safetensors": (lambda p: {"--output": p["root"] / "x.ckpt"}, "must end in .safetensors"),
    "eight_bit_without_bitsandbytes": (lambda p: {"--use-8bit-adam": None}, "bitsandbytes"),
    "unknown_save_precision": (lambda p: {"--save-precision": "int8"}, "unknown --save-precision 'int8'"),
    "unknown_config_key": (lambda p: {"--config": write(p["root"] / "c.yaml", "learning_rat: 1\n")}, "unknown options ['learning_rat']"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_its_message_and_writes_nothing(case, paths, capsys, monkeypatch):
    if case == "eight_bit_without_bitsandbytes":  # bitsandbytes is in the lock: hide it, as a machine without it has none
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` then raises ImportError
    change, expected = BAD_INPUTS[case]
    overrides = change(paths)
    flags = {k: v for k, v in overrides.items() if v is not None}
    argv = base_args(paths, **flags) + [k for k, v in overrides.items() if v is None]
    before = set(paths["root"].rglob("*"))
    capsys.readouterr()
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert set(paths["root"].rglob("*")) == before, "a bad run wrote files"
