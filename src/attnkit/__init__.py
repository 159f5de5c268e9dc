"""attnkit: attention mechanisms behind one interface (DESIGN §1).

import attnkit
o = attnkit.attend(q, k, v, "linear", pattern="causal_self")
layer = attnkit.Attention(dim=512, heads=8, kv_heads=2, mechanism="softmax", rope=True)
"""

# Load the package of mechanism files before binding the function `mechanisms`: importing a
# subpackage for the first time sets it as an attribute of its parent, which would shadow the function.
from . import mechanisms as _mechanism_files  # noqa: F401, I001
from .api import attend, create, info, mechanisms
from .errors import AttnkitError, DTypeError, InvalidOption, ShapeError, UnknownMechanism, UnsupportedPattern
from .mechanism import Mechanism, MechanismInfo, last_path
from .mechanisms.hedgehog import distill_attention
from .nn import Attention
from .patterns import Pattern
from .state import KVCache, RecurrentState, State, WindowCache

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttnkitError",
    "DTypeError",
    "InvalidOption",
    "KVCache",
    "Mechanism",
    "MechanismInfo",
    "Pattern",
    "RecurrentState",
    "ShapeError",
    "State",
    "UnknownMechanism",
    "UnsupportedPattern",
    "WindowCache",
    "attend",
    "create",
    "distill_attention",
    "info",
    "last_path",
    "mechanisms",
]


def __getattr__(name: str):
    """``attnkit.viz`` on first use: it imports matplotlib, which ``import attnkit`` should not pay for."""
    if name == "viz":
        import importlib

        return importlib.import_module(".viz", __name__)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
