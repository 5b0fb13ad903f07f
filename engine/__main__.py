"""`python -m engine ...`: the `halfbyte` command without relying on the console script."""

from engine.cli import main

if __name__ == "__main__":
    main(prog_name="halfbyte")
