"""Import the README's plugin example from examples/ (it is not a package)."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "remove_double_neg.py"


def load_example_pass():
    spec = importlib.util.spec_from_file_location("remove_double_neg_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RemoveDoubleNeg()
