"""The trainer's model layer with real tiny diffusers models: loading (folder, single file, plug-in
families), offline; conditions, schedules and denoise of each family; the two PEFT adapters."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_models import FAMILIES, save_tiny_pipeline, save_tiny_single_file
from tdm_core.schedules import FlowSchedule, VPSchedule

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # proves that nothing is fetched from the hub while loading
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_families")
    return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def single_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_single_files")
    return {family: save_tiny_single_file(family, root / family) for family in ("sd15", "sdxl", "sd3")}


def load(path, **kwargs):
    from training.models import load_family

    return load_family(str(path), **kwargs)


EXPECTED = {  # family -> (prediction type, schedule class, condition keys)
    "sd15": ("epsilon", VPSchedule, {"encoder_hidden_states"}),
    "sdxl": ("epsilon", VPSchedule, {"encoder_hidden_states", "text_embeds", "time_ids"}),
    "pixart": ("epsilon", VPSchedule, {"encoder_hidden_states", "encoder_attention_mask"}),
    "sd3": ("flow", FlowSchedule, {"encoder_hidden_states", "pooled_projections"}),
}


@pytest.mark.parametrize("family_name", FAMILIES)
def test_family_from_diffusers_folder(tiny_folders, family_name):
    family = load(tiny_folders[family_name])
    prediction_type, schedule_class, cond_keys = EXPECTED[family_name]
    assert family.name == family_name
    assert family.prediction_type == prediction_type
    assert isinstance(family.schedule, schedule_class)
    assert not any(p.requires_grad for p in family.network.parameters())

    cond = family.encode_prompts(["a red cube", "a blue ball", "a red cube"])
    assert set(cond) == cond_keys
    assert all(v.shape[0] == 3 for v in cond.values())
    assert torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    assert not torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])
    null = family.null_condition(2)
    assert set(null) == cond_keys and all(v.shape[0] == 2 for v in null.values())

    shape = family.latent_shape(3)
    assert shape == (3, 4, 8, 8)
    x_t = torch.randn(shape)
    out = family.denoise(x_t, torch.tensor([999.0, 500.0, 1.0]), cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    images = family.decode(x_t)
    assert images.shape == (3, 3, 16, 16)
    assert ((images > 0) & (images < 1)).float().mean() > 0.5, "decoded images are saturated: wrong latent scaling"


def test_text_encoders_run_once_per_distinct_prompt(tiny_folders):
    family = load(tiny_folders["sd15"])
    calls = []
    family.pipeline.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    family.encode_prompts(["a", "b", "a"])
    family.encode_prompts(["b", "a"])
    family.null_condition(4)
    family.null_condition(1)
    assert calls == [2, 1]  # "a" and "b" batched together once, then "" once


def test_denoise_calls_the_network_at_the_model_timestep(tiny_folders):
    # VP: the network sees the integer timestep itself; flow: the shifted sigma times 1000
    sd15 = load(tiny_folders["sd15"])
    cond = sd15.encode_prompts(["x", "y"])
    x_t = torch.randn(sd15.latent_shape(2))
    direct = sd15.network(x_t, torch.tensor([700, 30]), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(sd15.denoise(x_t, torch.tensor([700.0, 30.0]), cond), direct, atol=1e-6)

    sd3 = load(tiny_folders["sd3"])
    assert sd3.schedule.shift == 3.0
    cond = sd3.encode_prompts(["x"])
    x_t = torch.randn(sd3.latent_shape(1))
    t = torch.tensor([500.0])
    sigma = 3 * 0.5 / (1 + 2 * 0.5)
    direct = sd3.network(hidden_states=x_t, timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=cond["encoder_hidden_states"],
                         pooled_projections=cond["pooled_projections"]).sample
    assert torch.allclose(sd3.denoise(x_t, t, cond), direct, atol=1e-5)


def test_sdxl_null_condition_is_zero_embeddings_with_time_ids(tiny_folders):
    family = load(tiny_folders["sdxl"])
    null = family.null_condition(2)
    assert torch.count_nonzero(null["encoder_hidden_states"]) == 0 and torch.count_nonzero(null["text_embeds"]) == 0
    assert null["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_schedule_follows_scheduler_config(tmp_path):
    from diffusers import DDIMScheduler

    folder = save_tiny_pipeline("sd15", tmp_path / "vpred", prediction_type="v_prediction", zero_snr=True)
    family = load(folder)
    assert family.prediction_type == "v_prediction"
    reference = DDIMScheduler.from_pretrained(str(folder / "scheduler")).alphas_cumprod.double()
    assert torch.allclose(family.schedule.alphas_cumprod, reference, rtol=1e-5, atol=1e-9)
    assert family.schedule.alphas_cumprod[-1] < 1e-12  # zero terminal SNR


@pytest.mark.parametrize("family_name", ["sd15", "sdxl", "sd3"])
def test_single_file_checkpoint_loads_same_weights(single_files, family_name):
    checkpoint, config_folder = single_files[family_name]
    from_file = load(checkpoint, config_path=config_folder)
    from_folder = load(config_folder)
    assert from_file.name == family_name
    for component in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(from_file.pipeline, component, None), getattr(from_folder.pipeline, component, None)
        if b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), component
        assert all(torch.equal(sa[k], sb[k]) for k in sb), component
    cond = from_file.encode_prompts(["same"])
    assert torch.equal(cond["encoder_hidden_states"], from_folder.encode_prompts(["same"])["encoder_hidden_states"])


def test_bad_inputs_raise_clear_errors(tmp_path, single_files):
    from safetensors.torch import save_file

    from training.errors import TrainingInputError

    with pytest.raises(TrainingInputError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputError, match="not a model folder"):
        load(tmp_path / "empty")
    (tmp_path / "model.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(TrainingInputError, match="not a .safetensors"):
        load(tmp_path / "model.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingInputError, match="cannot read"):
        load(tmp_path / "broken.safetensors")
    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TrainingInputError, match="unknown architecture"):
        load(tmp_path / "other.safetensors")
    checkpoint, _ = single_files["sd15"]
    with pytest.raises(TrainingInputError, match="config_path"):
        load(checkpoint, config_path=tmp_path / "empty")
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "tdm_family.json").write_text(json.dumps({"family": "no_such_family"}))
    with pytest.raises(TrainingInputError, match="unknown model family 'no_such_family'"):
        load(tmp_path / "plugin")


def test_registered_family_loads_from_tdm_family_json(tmp_path):
    from training.models import load_family, register_family

    seen = {}

    def loader(path, device, dtype, config_path):
        seen.update(path=path, dtype=dtype)
        return "toy family object"

    register_family("toy_for_test", loader)
    (tmp_path / "tdm_family.json").write_text(json.dumps({"family": "toy_for_test"}))
    assert load_family(str(tmp_path), dtype=torch.float64) == "toy family object"
    assert seen == {"path": str(tmp_path), "dtype": torch.float64}


# --- adapters -----------------------------------------------------------------------------------
def _randomise(params, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_adapters_off_is_the_base_model_bit_identically(tiny_folders, family_name):
    from training.models import FAKE_SCORE, STUDENT, adapter_parameters, add_tdm_adapters, use_adapter

    family = load(tiny_folders[family_name])
    cond = family.encode_prompts(["p", "q"])
    x_t = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([800.0, 100.0])
    base = family.denoise(x_t, t, cond)
    add_tdm_adapters(family, rank=4, alpha=4)
    with use_adapter(family.network, STUDENT):  # B = 0 at init: the student starts as the teacher
        assert torch.equal(family.denoise(x_t, t, cond), base)
    _randomise(adapter_parameters(family.network, STUDENT), 1)
    _randomise(adapter_parameters(family.network, FAKE_SCORE), 2)
    with use_adapter(family.network, None):
        teacher = family.denoise(x_t, t, cond)
    with use_adapter(family.network, STUDENT):
        student = family.denoise(x_t, t, cond)
    with use_adapter(family.network, FAKE_SCORE):
        fake = family.denoise(x_t, t, cond)
    assert torch.equal(teacher, base)
    assert not torch.allclose(student, base) and not torch.allclose(fake, base) and not torch.allclose(student, fake)


def test_switching_adapters_keeps_requires_grad_and_routes_gradients(tiny_folders):
    from training.models import (FAKE_SCORE, STUDENT, active_adapter, adapter_parameters, add_tdm_adapters,
                                 use_adapter)

    family = load(tiny_folders["sd15"])
    add_tdm_adapters(family, rank=2, alpha=2)
    student, fake = adapter_parameters(family.network, STUDENT), adapter_parameters(family.network, FAKE_SCORE)
    _randomise(student + fake, 3)  # non-zero B so that both factors receive gradient
    base = [p for n, p in family.network.named_parameters() if ".lora_" not in n]
    assert student and fake and base
    cond = family.encode_prompts(["p"])
    x_t = torch.randn(family.latent_shape(1))

    for name, owned, other in ((STUDENT, student, fake), (FAKE_SCORE, fake, student), (None, [], student + fake)):
        with use_adapter(family.network, name):
            assert active_adapter(family.network) == name
            loss = family.denoise(x_t, torch.tensor([500.0]), cond).square().mean()
        assert all(p.requires_grad for p in student + fake), f"switching to {name} froze an adapter"
        assert not any(p.requires_grad for p in base)
        if name is not None:
            loss.backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned)
            assert all(p.grad is None for p in other)
            for p in owned:
                p.grad = None
        else:
            assert not loss.requires_grad  # the teacher has nothing to train
    assert active_adapter(family.network) == STUDENT  # the context managers restored the default


def test_adapter_state_dict_round_trip(tiny_folders):
    from training.errors import TrainingInputError
    from training.models import (FAKE_SCORE, STUDENT, adapter_parameters, adapter_state_dict, add_tdm_adapters,
                                 load_adapter_state_dict)

    family = load(tiny_folders["pixart"])
    add_tdm_adapters(family, rank=2, alpha=1)
    _randomise(adapter_parameters(family.network, STUDENT), 5)
    saved = adapter_state_dict(family.network, STUDENT)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    load_adapter_state_dict(family.network, FAKE_SCORE, saved)
    assert all(torch.equal(a, b) for a, b in zip(adapter_parameters(family.network, STUDENT), adapter_parameters(family.network, FAKE_SCORE)))
    with pytest.raises(TrainingInputError, match="does not match"):
        load_adapter_state_dict(family.network, STUDENT, {"nope.lora_A.weight": torch.zeros(1)})
    with pytest.raises(TrainingInputError, match="rank"):
        add_tdm_adapters(family, rank=0, alpha=1)


# --- shipped configs for single-file checkpoints ---------------------------------------------------
# public parameter counts of the real models (diffusers / transformers classes)
SHIPPED_PARAMETER_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("family_name", sorted(SHIPPED_PARAMETER_COUNTS))
def test_shipped_configs_describe_the_real_architectures(family_name):
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from training.models import CONFIGS_DIR, detect_folder_family

    folder = CONFIGS_DIR / family_name
    assert detect_folder_family(folder) == family_name
    index = json.loads((folder / "model_index.json").read_text())
    for component, expected in SHIPPED_PARAMETER_COUNTS[family_name].items():
        library, class_name = index[component]
        cls = getattr({"diffusers": diffusers, "transformers": transformers}[library], class_name)
        with init_empty_weights():  # meta tensors: counts without allocating gigabytes
            if library == "diffusers":
                model = cls.from_config(cls.load_config(str(folder / component)))
            else:
                model = cls(cls.config_class.from_pretrained(str(folder / component)))
        assert sum(p.numel() for p in model.parameters()) == expected, component


@pytest.mark.slow
def test_comfyui_sd15_checkpoint_loads_with_shipped_config():
    # a random-weight checkpoint with the exact SD1.5 layout, written by ComfyUI's own classes
    from safetensors import safe_open

    from tests.helpers.checkpoints import sd15_checkpoint

    path = sd15_checkpoint()
    family = load(path, dtype=torch.float16)  # no config_path: training/configs/sd15 + a local CLIP vocabulary
    assert family.name == "sd15" and family.prediction_type == "epsilon"
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.get_tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    loaded = family.network.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(loaded, stored.to(loaded.dtype))
    assert family.pipeline.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]  # the real CLIP vocabulary
    assert family.encode_prompts(["a cat"])["encoder_hidden_states"].shape == (1, 77, 768)


def test_sdxl_size_conditions_follow_the_latent_size(tiny_folders):
    family = load(tiny_folders["sdxl"])
    cond = family.encode_prompts(["p"])
    x_t = torch.randn(family.latent_shape(1, resolution=32))
    ids = torch.tensor([[32, 32, 0, 0, 32, 32]], dtype=torch.float32)
    direct = family.network(x_t, torch.tensor([400]), encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": ids}).sample
    assert torch.allclose(family.denoise(x_t, torch.tensor([400.0]), cond), direct, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 2"):
        family.latent_shape(1, resolution=33)


def test_family_option_must_match_the_folder(tiny_folders):
    from training.errors import TrainingInputError

    with pytest.raises(TrainingInputError, match="holds a sd15 model, not sdxl"):
        load(tiny_folders["sd15"], family="sdxl")
    assert load(tiny_folders["sd15"], family="sd15").name == "sd15"


def test_prompt_cache_survives_offloading_and_bad_prompt_lists_are_refused(tiny_folders):
    family = load(tiny_folders["sd3"])
    before = family.encode_prompts(["kept", "new one"])
    family.offload_text_encoders("cpu")
    assert family.pipeline.text_encoder_3.device.type == "cpu" and family.text_device.type == "cpu"
    after = family.encode_prompts(["kept", "new one", "third"])
    assert torch.equal(after["encoder_hidden_states"][:2], before["encoder_hidden_states"])
    with pytest.raises(ValueError, match="non-empty list"):
        family.encode_prompts([])
    with pytest.raises(ValueError, match="wrap a single prompt"):
        family.encode_prompts("a bare string")


def test_dtype_and_unknown_adapter_name(tiny_folders):
    from training.models import add_tdm_adapters, use_adapter

    family = load(tiny_folders["sd15"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in family.network.parameters())
    cond = family.encode_prompts(["p"])
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    x_t = torch.randn(family.latent_shape(1), dtype=torch.bfloat16)
    assert family.denoise(x_t, torch.tensor([10.0]), cond).dtype == torch.bfloat16
    add_tdm_adapters(family, rank=2, alpha=2)
    with pytest.raises(ValueError, match="no adapter named 'teacher'"):
        with use_adapter(family.network, "teacher"):
            pass
