"""A host side of ``tdm_core.iteration.tdm_iteration`` for tests of the core: it keeps every loss it is
handed (graphs alive, for ``torch.autograd.grad``) and steps nothing."""
from __future__ import annotations

from tdm_core.iteration import FAKE_SCORE, STUDENT, TDMUpdates


def recording_updates() -> tuple[TDMUpdates, dict]:
    """``(updates, handed)``: ``handed[role]`` lists the chunk losses back-propagation was asked for."""
    handed = {FAKE_SCORE: [], STUDENT: []}
    return TDMUpdates(backward=lambda role, loss: handed[role].append(loss), step=lambda role: None), handed
