"""``python -m study``: see :mod:`study.run`."""

from .run import main

raise SystemExit(main())
