"""Structure: which units of a model are coupled, and which layers are left alone (and why).

``find_groups(model, example_inputs)`` traces one forward pass and returns a
:class:`Structure`: ``groups`` (one :class:`Group` per prunable layer key, with every module
edit that removing a unit implies) and ``skipped`` (keys and modules left alone, each with a
reason). ``README.md`` beside this file says what is followed and what is refused.
"""

from __future__ import annotations

from .build import find_groups
from .structure import (
    HIDDEN_PREFIX,
    ROLE_FEATURES,
    ROLE_IN,
    ROLE_OUT,
    Group,
    Member,
    Skipped,
    Structure,
    hidden_role,
    parse_hidden_role,
)

__all__ = [
    "find_groups",
    "Structure",
    "Group",
    "Member",
    "Skipped",
    "ROLE_IN",
    "ROLE_OUT",
    "ROLE_FEATURES",
    "HIDDEN_PREFIX",
    "hidden_role",
    "parse_hidden_role",
]
