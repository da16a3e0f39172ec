"""Improved-DDPM training: the trainer package (see the README's layout table).

Running a script of this package as a file (``python trainer/main.py``, ``deepspeed trainer/main.py``)
puts ``trainer/`` itself first on ``sys.path``, where its modules (``config``, ``data``, ``evaluate``, ...)
would shadow top-level packages of the same names. Importing the package removes that entry, so every
script under ``trainer/`` imports it first; that is the one place this is done. (No module here may be
named ``trainer``: it would shadow the package itself during that first import.)
"""

import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
