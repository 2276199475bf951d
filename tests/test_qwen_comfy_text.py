"""ComfyUI's own Qwen-Image prompt encoding (QwenImageTokenizer + QwenImageTEModel, what CLIPLoader type
qwen_image and CLIPTextEncode run) gives the embeddings QwenImagePipeline.encode_prompt gives, which the trainer's
family reproduces (tests/test_qwen_family.py): the student sees in ComfyUI the conditions it was distilled on,
the empty negative prompt included."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_qwen import comfy_qwen_text_encoder, comfy_tokenizer_folder, tiny_qwen_text_encoder_128

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoders():
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    text_encoder = tiny_qwen_text_encoder_128()
    pipe = QwenImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=text_encoder,
                             tokenizer=Qwen2Tokenizer.from_pretrained(str(comfy_tokenizer_folder())))
    return pipe, *comfy_qwen_text_encoder(text_encoder)


@pytest.mark.parametrize("prompt", ["a red cat", "", "a photo of a red fox in a snowy forest, golden hour, highly detailed"])
def test_comfyuis_prompt_encoding_is_the_pipelines(encoders, prompt):
    pipe, comfy_te, comfy_tokenizer = encoders
    with torch.no_grad():
        ours, _, extra = comfy_te.encode_token_weights(comfy_tokenizer.tokenize_with_weights(prompt))
        reference, mask = pipe.encode_prompt([prompt], device="cpu")
    assert mask is None and not extra  # one prompt: no padding on either side
    assert ours.shape == reference.shape and ours.shape[1] == len(pipe.tokenizer(prompt).input_ids) + 5  # the template's tail
    assert torch.allclose(ours, reference, atol=1e-5)
