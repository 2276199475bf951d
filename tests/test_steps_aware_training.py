"""training.steps_aware on a real (tiny) diffusers UNet with the two TDM PEFT adapters: each adapter sees
its own K table, the teacher none; the tables are trained, checkpointed and exported with their adapter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import comfy_inprocess as h
from tdm_core.steps_aware import K_EMBEDDING_KEY
from training.errors import TrainingInputError
from training.models import (
    FAKE_SCORE,
    STUDENT,
    adapter_parameters,
    adapter_state_dict,
    add_tdm_adapters,
    load_adapter_state_dict,
    use_adapter,
)
from training.steps_aware import (
    TABLE_STATE_KEY,
    begin_batch,
    install_k_embedding,
    k_embedding_of,
    k_embedding_tensors,
    num_steps,
    remove_k_embedding,
    load_k_table,
    set_num_steps,
    without_k_table,
)


def tiny_family(seed: int = 3):
    torch.set_num_threads(1)
    unet = h.tiny_diffusers_unet(seed)
    family = SimpleNamespace(name="sd15", network=unet, lora_target_modules=h.LORA_TARGETS, kohya_prefix="lora_unet",
                             prediction_type="epsilon", num_timesteps=1000)
    add_tdm_adapters(family, rank=4, alpha=8.0)
    return family


def randomise_(network, seed: int = 0, tables: bool = True) -> None:
    """Random LoRA B factors (PEFT starts them at 0) and K tables, so every part changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".lora_B." in name or (tables and ".lora_k_table" in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def run(network, adapter, k=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 5, h.TINY_CONTEXT_DIM, generator=g)
    with torch.no_grad(), use_adapter(network, adapter):
        if k is None:
            return network(x, torch.tensor([500.0, 200.0]), encoder_hidden_states=cond).sample
        with num_steps(network, k):
            return network(x, torch.tensor([500.0, 200.0]), encoder_hidden_states=cond).sample


@pytest.fixture
def family():
    f = tiny_family()
    install_k_embedding(f.network, [1, 2, 4])
    randomise_(f.network)
    return f


def test_each_adapter_sees_its_own_k_and_the_teacher_none(family):
    net = family.network
    k_module = k_embedding_of(net)
    assert k_module.table(STUDENT).shape == (8, 32 * 4)  # K = 1..8, width of the UNet's time embedding
    teacher = [run(net, None, k) for k in (1, 2, 4)]
    assert all(torch.equal(teacher[0], t) for t in teacher[1:])
    for adapter in (STUDENT, FAKE_SCORE):
        outs = [run(net, adapter, k) for k in (1, 2, 4)]
        assert (outs[0] - outs[2]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3
    # the two adapters have separate tables: zeroing the student's changes only the student
    before_fake = run(net, FAKE_SCORE, 4)
    with torch.no_grad():
        k_module.table(STUDENT).zero_()
    assert torch.equal(run(net, FAKE_SCORE, 4), before_fake)
    assert torch.equal(run(net, STUDENT, 1), run(net, STUDENT, 4))


def test_zero_tables_and_removal_give_back_the_unconditioned_network():
    f = tiny_family()
    randomise_(f.network, tables=False)
    plain = run(f.network, STUDENT)
    install_k_embedding(f.network, [1, 2, 4])
    assert torch.equal(run(f.network, STUDENT, 4), plain)  # zero init: training starts at the plain student
    randomise_(f.network)
    assert not torch.equal(run(f.network, STUDENT, 4), run(f.network, STUDENT, 1))
    with torch.no_grad():
        k_embedding_of(f.network).table(STUDENT).zero_()
    unconditioned = run(f.network, STUDENT, 4)  # the randomised LoRA without the K condition
    with torch.no_grad():
        k_embedding_of(f.network).table(STUDENT).fill_(0.5)
    assert not torch.equal(run(f.network, STUDENT, 4), unconditioned)
    remove_k_embedding(f.network)
    assert k_embedding_of(f.network) is None
    assert not any("k_table" in n for n, _ in f.network.named_parameters())
    assert torch.equal(run(f.network, STUDENT), unconditioned)  # hook gone with the table


def test_ablation_conditions_only_the_student():
    f = tiny_family()
    install_k_embedding(f.network, [1, 4], adapters=(STUDENT,))
    randomise_(f.network)
    assert k_embedding_of(f.network).table(FAKE_SCORE) is None
    assert torch.equal(run(f.network, FAKE_SCORE, 1), run(f.network, FAKE_SCORE, 4))
    assert not torch.equal(run(f.network, STUDENT, 1), run(f.network, STUDENT, 4))
    assert k_embedding_tensors(f.network, FAKE_SCORE) == {}


def test_tables_belong_to_their_adapters_optimiser_and_checkpoint(family):
    net = family.network
    student_params = adapter_parameters(net, STUDENT)
    fake_params = adapter_parameters(net, FAKE_SCORE)
    k_module = k_embedding_of(net)
    assert any(p is k_module.table(STUDENT) for p in student_params)
    assert not any(p is k_module.table(STUDENT) for p in fake_params)
    assert any(p is k_module.table(FAKE_SCORE) for p in fake_params)
    # one optimiser step on a student loss moves the student's table (and LoRA), never the fake score's
    optimiser = torch.optim.SGD(student_params, lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    set_num_steps(net, 2)
    with use_adapter(net, STUDENT):
        x = torch.randn(2, 4, 8, 8)
        out = net(x, torch.tensor([800.0, 300.0]), encoder_hidden_states=torch.randn(2, 5, h.TINY_CONTEXT_DIM)).sample
    out.square().mean().backward()
    optimiser.step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert "tdm_k_embedding.tables.student.lora_k_table" in moved
    assert all(".student." in n for n in moved)
    # only row K=2 had a gradient: the other rows of the table stay as they were
    rows_moved = (k_module.table(STUDENT) != before["tdm_k_embedding.tables.student.lora_k_table"]).any(dim=1)
    assert rows_moved.tolist() == [False, True] + [False] * 6
    # checkpoint round trip through the trainer's own adapter state functions
    state = adapter_state_dict(net, STUDENT)
    assert TABLE_STATE_KEY in state and TABLE_STATE_KEY not in without_k_table(state)
    assert len(without_k_table(state)) == len(state) - 1
    with torch.no_grad():
        k_module.table(STUDENT).zero_()
    load_adapter_state_dict(net, STUDENT, state)
    assert torch.equal(k_module.table(STUDENT), state[TABLE_STATE_KEY])


def test_begin_batch_sets_k_grid_and_is_reproducible(family):
    parts = SimpleNamespace(family=family, grid=[899], total_steps=900, generator=torch.Generator().manual_seed(3))
    ks = [begin_batch(parts, [1, 2, 4]) for _ in range(30)]
    assert set(ks) == {1, 2, 4}
    assert parts.grid == {1: [899], 2: [899, 449], 4: [899, 674, 449, 224]}[ks[-1]]
    assert k_embedding_of(family.network).num_steps == ks[-1]
    again = SimpleNamespace(family=family, grid=[], total_steps=900, generator=torch.Generator().manual_seed(3))
    assert [begin_batch(again, [1, 2, 4]) for _ in range(30)] == ks


def test_export_tensors_and_errors(family):
    tensors = k_embedding_tensors(family.network)
    assert list(tensors) == [K_EMBEDDING_KEY]
    assert torch.equal(tensors[K_EMBEDDING_KEY], k_embedding_of(family.network).table(STUDENT).detach())
    load_k_table(family.network, tensors[K_EMBEDDING_KEY] + 1)
    assert torch.equal(k_embedding_of(family.network).table(STUDENT).detach(), tensors[K_EMBEDDING_KEY] + 1)
    with pytest.raises(TrainingInputError, match=r"shape \(4, 128\) does not fit this network's \(8, 128\)"):
        load_k_table(family.network, torch.zeros(4, 128))
    with pytest.raises(TrainingInputError, match="already carries"):
        install_k_embedding(family.network, [1, 2])
    with pytest.raises(ValueError, match="outside"):
        set_num_steps(family.network, 9)
    fresh = tiny_family()
    install_k_embedding(fresh.network, [1, 4])
    with pytest.raises(RuntimeError, match="set_num_steps"):
        run(fresh.network, STUDENT)  # no K set yet: a clear error, not a silently unconditioned student
    with pytest.raises(TrainingInputError, match="timestep embedding"):
        install_k_embedding(torch.nn.Linear(2, 2), [1])
