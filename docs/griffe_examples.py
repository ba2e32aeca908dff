"""Griffe extension for the API reference: read our `Example:` docstring sections as examples.

The Google style parser treats `Examples:` as a section of doctests (rendered as code) but
`Example:` as a free-form admonition, whose `>>>` lines Markdown would then read as text (and
`['fc1']` as a broken link). Renaming the heading before parsing keeps the source as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename `Example:` section headings to `Examples:` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
