"""``python -m fedml_pfedmoap.flower {simulation,deployment} --config X.yaml`` (see ``launch.py``)."""
import sys

from .launch import main

sys.exit(main())
