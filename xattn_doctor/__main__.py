"""`python -m xattn_doctor` runs the command line."""

from xattn_doctor.cli import main

main()
