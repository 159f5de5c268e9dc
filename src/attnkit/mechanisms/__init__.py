"""One module per mechanism; each registers itself on import (discovered by the registry)."""
