"""tdm_core.steps_aware: the K-condition table, its lookup/addition, K draws and K inferred from sampled timesteps."""
from __future__ import annotations

import pytest
import torch

from tdm_core import reference_grid
from tdm_core.steps_aware import (
    add_k_embedding,
    draw_num_steps,
    grid_for_num_steps,
    infer_num_steps,
    k_embedding,
    new_k_table,
    parse_k_choices,
)


def test_parse_k_choices_sorts_dedups_and_names_bad_input():
    assert parse_k_choices("4, 1,2,4") == [1, 2, 4]
    assert parse_k_choices([2, 1]) == [1, 2]
    with pytest.raises(ValueError, match="not integers.*'1,2,4'"):
        parse_k_choices("1,two")
    with pytest.raises(ValueError, match="between 1 and 8"):
        parse_k_choices("0,4")
    with pytest.raises(ValueError, match="empty"):
        parse_k_choices("")


def test_new_table_is_zero_so_conditioning_starts_as_a_no_op():
    table = new_k_table(4, 6)
    temb = torch.randn(3, 6)
    assert table.shape == (4, 6)
    assert torch.equal(add_k_embedding(temb, 2, table), temb)


def test_lookup_is_row_k_minus_one_per_batch_or_per_sample():
    table = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(k_embedding(1, table), table[0])
    assert torch.equal(k_embedding(4, table), table[3])
    per_sample = k_embedding(torch.tensor([1, 4, 2]), table)
    assert torch.equal(per_sample, table[[0, 3, 1]])
    temb = torch.ones(3, 3, dtype=torch.float64)
    out = add_k_embedding(temb, torch.tensor([1, 4, 2]), table)
    assert out.dtype == torch.float64 and torch.equal(out, 1 + table[[0, 3, 1]].double())
    # an embedding with a token dimension (B, N, D) gets the per-sample row broadcast over N
    tokens = add_k_embedding(torch.zeros(2, 5, 3), torch.tensor([2, 3]), table)
    assert torch.equal(tokens[:, 4], table[[1, 2]])


def test_k_without_a_row_and_width_mismatch_are_clear_errors():
    table = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"K=\[5\] has no row.*1 to 4 steps"):
        k_embedding(5, table)
    with pytest.raises(ValueError, match=r"K=\[0\]"):
        add_k_embedding(torch.zeros(1, 8), 0, table)
    with pytest.raises(ValueError, match="width 8 but .* width 16.*another architecture"):
        add_k_embedding(torch.zeros(1, 16), 1, table)


def test_draws_cover_the_choices_and_repeat_with_the_generator():
    draws = [draw_num_steps([1, 2, 4], torch.Generator().manual_seed(s)) for s in range(60)]
    assert set(draws) == {1, 2, 4}
    assert all(0.2 < draws.count(k) / len(draws) < 0.5 for k in (1, 2, 4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw_num_steps([1, 2, 4], g1) for _ in range(10)] == [draw_num_steps([1, 2, 4], g2) for _ in range(10)]


def test_grid_per_k_is_the_reference_rule():
    assert grid_for_num_steps(4, 900) == [899, 674, 449, 224] == reference_grid(4, 900)
    assert grid_for_num_steps(1, 900) == [899]


def test_infer_num_steps_from_whole_grids_tails_and_custom_grids():
    assert infer_num_steps([899, 674, 449, 224], [1, 2, 4], 900) == 4
    assert infer_num_steps([899], [1, 2, 4], 900) == 1
    # img2img keeps the tail of the K-step grid: the tail of K=4, not a 2- or 1-step grid
    assert infer_num_steps([449, 224], [1, 2, 4], 900) == 4
    assert infer_num_steps([224.0002], [1, 2, 4], 900) == 4
    assert infer_num_steps([449], [1, 2, 4], 900) == 2
    # a custom grid that is no tail of a trained K: its own length
    assert infer_num_steps([999, 500, 100], [1, 2, 4], 900) == 3
    with pytest.raises(ValueError, match="cannot be inferred"):
        infer_num_steps([], [1, 2, 4], 900)
