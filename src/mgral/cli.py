"""The ``mgral`` command line (placeholder until the sub-commands are wired)."""


def main(argv: list[str] | None = None) -> int:
    return 0
