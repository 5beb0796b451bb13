"""How a message tells the user to install an optional extra of pyproject.toml.

titan_cp is not on PyPI, so `pip install titan_cp[extra]` would fetch nothing (or someone else's
package): extras install from the checkout, as the README does. The extra is quoted so that zsh
does not read the brackets as a glob.
"""


def install_hint(extra: str) -> str:
    """The command that installs `extra`, for a one-line message."""
    return f"pip install -e '.[{extra}]' in the titan_cp checkout"
