"""tdm_core.grids: the student's timesteps (METHOD.md "The student", "Released inference settings")."""
from __future__ import annotations

import pytest

from tdm_core import parse_grid, reference_grid, tail_for_denoise
from tdm_core.grids import RELEASED_GRIDS, check_grid, grid_with_end


def test_reference_grid_examples_from_method_md():
    assert reference_grid(4, 900) == [899, 674, 449, 224]
    assert reference_grid(4, 800) == [799, 599, 399, 199]
    assert reference_grid(1, 900) == [899]
    for k in range(1, 9):  # strictly decreasing, K points, inside the table
        grid = reference_grid(k, 900)
        assert len(grid) == k and check_grid(grid) == grid


def test_released_cogvideox_grid_and_end_point():
    assert RELEASED_GRIDS["cogvideox_2b"] == (999, 856, 665, 399)
    assert grid_with_end([999, 856, 665, 399]) == [999, 856, 665, 399, 0]


@pytest.mark.parametrize("text", ["999, 856, 665, 399", "999,856,665,399", "999 856 665 399", "999; 856; 665; 399", " 999.0, 856 ,665, 399 "])
def test_parse_grid_accepts_the_usual_separators(text):
    assert parse_grid(text) == [999, 856, 665, 399]


@pytest.mark.parametrize(
    "text,message",
    [
        ("999, abc", "are not numbers: write e.g. '999, 856, 665, 399'"),
        ("", "the trajectory grid is empty"),
        ("999, 999, 500", "must be strictly decreasing"),
        ("399, 665", "must be strictly decreasing"),
        ("1000, 500", r"timesteps outside 0\.\.999"),
        ("500, -1", r"timesteps outside 0\.\.999"),
    ],
)
def test_parse_grid_errors_name_the_problem_and_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(text)


@pytest.mark.parametrize("num_steps", [0, 901])
def test_reference_grid_rejects_impossible_step_counts(num_steps):
    with pytest.raises(ValueError, match=f"K={num_steps} is outside 1..900"):
        reference_grid(num_steps, 900)


@pytest.mark.parametrize("denoise,expected", [(1.0, [999, 856, 665, 399]), (0.5, [665, 399]), (0.6, [665, 399]), (0.7, [856, 665, 399]), (0.05, [399])])
def test_tail_for_denoise_keeps_the_last_trained_timesteps(denoise, expected):
    assert tail_for_denoise([999, 856, 665, 399], denoise) == expected


@pytest.mark.parametrize("denoise", [0.0, -0.5, 1.5])
def test_tail_for_denoise_rejects_out_of_range_strength(denoise):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        tail_for_denoise([999, 499], denoise)
