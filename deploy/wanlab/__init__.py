"""wanlab: a WAN on one machine (network namespaces, htb links, a user-space delay line).

``python -m wanlab up|down|ceiling``; from Python, ``with Lab(LabSpec(...)) as lab``.
"""

from wanlab.lab import Lab, LabError, down
from wanlab.spec import LabSpec, SpecError

__all__ = ["Lab", "LabError", "LabSpec", "SpecError", "down"]
