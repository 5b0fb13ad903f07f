"""`python -m engine ...`: the `halfbyte` command without relying on the console script."""

from engine.cli import entry

if __name__ == "__main__":
    entry()
