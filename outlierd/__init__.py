"""The ``outlierd`` console script (``outlierd.cli``); the logic lives in core/, training/, server/."""
