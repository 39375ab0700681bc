"""``python -m fermi``: the ``fermi`` command, for an environment whose scripts folder is not
on PATH."""

from fermi.cli import main

if __name__ == "__main__":
    main(prog_name="fermi")
