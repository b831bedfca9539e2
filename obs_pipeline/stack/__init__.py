"""Local stack: PostgreSQL main + streaming replica + Redis (+ latency proxy) from pip-installed binaries.

`LocalStack(dir).up()` gives a laptop or the test-suite real services on free
loopback ports; see local_stack.py for the folder layout.
"""

from .errors import StackError
from .local_stack import LocalStack

__all__ = ["LocalStack", "StackError"]
