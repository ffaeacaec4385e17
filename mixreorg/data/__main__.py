"""``python -m mixreorg.data``: SynthShapes chance level (``--chance``), speed (``--bench``), example sheet."""

from __future__ import annotations

from .synthshapes import _main

if __name__ == "__main__":
    _main()
