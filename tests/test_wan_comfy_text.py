"""ComfyUI's own Wan text encoder (comfy.text_encoders.wan: UMT5 with its attention mask and the masked positions
zeroed, 512 tokens as ComfyUI's UMT5 tokenizer pads them) at a tiny size, holding the tiny UMT5's weights, gives
the same conditions as WanPipeline.encode_prompt on the same token ids, the empty prompt included: the student
meets in ComfyUI the conditions it was distilled on. (The tokenizer itself, UMT5's sentencepiece model read from
ComfyUI's file, is not on this machine and is not compared.)"""
from __future__ import annotations

import torch

from tests.helpers.tiny_wan import build_tiny_wan_pipeline

torch.set_num_threads(1)


def comfy_umt5(text_encoder):
    """ComfyUI's UMT5XXlModel (what CLIPLoader type wan builds) at the tiny UMT5's size, holding its weights."""
    from tests.helpers.tiny_models import import_comfy

    import_comfy()
    import comfy.sd1_clip
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan

    config = text_encoder.config
    json_config = {"d_ff": config.d_ff, "d_kv": config.d_kv, "d_model": config.d_model, "dense_act_fn": "gelu_pytorch_tanh",
                   "is_gated_act": True, "model_type": "umt5", "num_heads": config.num_heads, "num_layers": config.num_layers,
                   "vocab_size": config.vocab_size, "layer_norm_epsilon": config.layer_norm_epsilon}

    class TinyUMT5(comfy.text_encoders.wan.UMT5XXlModel):
        def __init__(self):  # UMT5XXlModel's settings with the tiny config instead of umt5_config_xxl.json
            comfy.sd1_clip.SDClipModel.__init__(self, device="cpu", layer="last", textmodel_json_config=json_config, dtype=torch.float32,
                                                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                                enable_attention_masks=True, zero_out_masked=True)

    model = TinyUMT5()
    state = {k: v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's UMT5 does not match the tiny one: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def test_comfyuis_umt5_conditions_equal_the_pipelines():
    from training.families.wan import MAX_SEQUENCE_LENGTH, WanFamily

    pipe = build_tiny_wan_pipeline()
    assert pipe.text_encoder.config.dense_act_fn == "gelu_new"  # UMT5's tanh GELU, ComfyUI's gelu_pytorch_tanh
    family = WanFamily(pipe)
    comfy_model = comfy_umt5(pipe.text_encoder)
    for prompt in ("a red cat", "a blue dog wearing a small green hat", ""):
        ids = pipe.tokenizer(prompt, add_special_tokens=True).input_ids  # ends with </s> = 1, as ComfyUI's tokenizer (add_eos)
        tokens = [[(i, 1.0) for i in ids + [0] * (MAX_SEQUENCE_LENGTH - len(ids))]]  # ComfyUI pads with 0 to min_length 512
        with torch.no_grad():
            theirs = comfy_model.encode_token_weights(tokens)[0]
        ours = family.encode_prompts([prompt])["encoder_hidden_states"]
        assert theirs.shape == ours.shape == (1, MAX_SEQUENCE_LENGTH, 32)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        assert not ours[0, len(ids):].any()  # zero-padded after the valid tokens on both sides
