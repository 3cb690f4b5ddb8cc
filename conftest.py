"""Repository-root conftest: makes pytest put the repository root on ``sys.path`` (rootdir conftest, prepend
import mode), so ``from tests.conftest import …`` works with the ``pytest`` script as with ``python -m pytest``."""
