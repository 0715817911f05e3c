"""The runtime roles by name (`disaggctl serve ROLE`): one table, importing each role's module.

Kept apart from `roles.py` so that the PD roles (`disagg.py`), which build on the base role there, are
registered without an import cycle; an encoder role is one more line here.
"""

from __future__ import annotations

from disaggctl.runtime.disagg import DecodeRole, PrefillRole
from disaggctl.runtime.roles import ColocatedRole, Role

ROLES: dict[str, type[Role]] = {"colocated": ColocatedRole, "prefill": PrefillRole, "decode": DecodeRole}
