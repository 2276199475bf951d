"""TDM Distill's run fingerprint samples every tensor of a real-size model: a tensor over 2**24 elements (SD1.5's
token embedding has 49408 x 768 = 37.9 M; the real-server run found the bug on a 29.5 M one) must be sampled, not
indexed past its end (float32 ``linspace`` rounded n - 1 up to n there)."""
from __future__ import annotations

import torch

from tests.helpers import comfy_inprocess as h


def test_tensor_sample_takes_the_last_element_of_a_tensor_over_2_to_the_24():
    fingerprint = h.pack_module("distill_fingerprint")
    n = 29_491_200  # the size the server run failed on (float32: 29491199 -> 29491200)
    tensor = torch.zeros(n, dtype=torch.int8)
    tensor[-1] = 7
    sample = fingerprint.tensor_sample(tensor)
    values = torch.frombuffer(bytearray(sample[-8 * fingerprint.SAMPLES_PER_TENSOR:]), dtype=torch.float64)
    assert values[-1].item() == 7.0 and values[0].item() == 0.0
