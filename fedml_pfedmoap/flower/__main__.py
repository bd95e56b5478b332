"""``python -m fedml_pfedmoap.flower {simulation,deployment} --config X.yaml`` (see ``launch.py``)."""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
