"""The bottom layer: the run folder's layout, atomic writes, the run's log and its progress events.

It imports nothing else of recipe_runner (tests/test_architecture.py checks), so every stage and
review tool above can use it.
"""

from recipe_runner.runfolder.layout import RunFolder

__all__ = ["RunFolder"]
