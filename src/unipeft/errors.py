"""The one exception type unipeft raises for bad input.

Every message is a single line that says what is wrong and how to fix it; the CLI prints it without a traceback.
"""


class UnipeftError(ValueError):
    """Bad input to unipeft: an invalid recipe, a target that matches nothing, a checkpoint that does not fit, ..."""
