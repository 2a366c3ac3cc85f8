"""The notebooks run in CI (nbmake) with small settings, read from the environment."""

import os

os.environ.setdefault("AACE_NB_EPOCHS", "2")
