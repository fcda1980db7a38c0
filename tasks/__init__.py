"""dermaflow stage code: one module per stage, pure functions, no Prefect.

``python -m tasks.<stage>`` (each command in dvc.yaml) imports this package before the stage
module, so the params check runs here, ahead of the stage's heavy imports (torch, SciPy,
great-expectations): a bad value anywhere in params.yaml stops the first stage of a
``dvc repro`` within a second of its start (:func:`tasks.stage.fail_fast`).
"""

import sys

if sys.argv[:1] == ["-m"]:  # Python is still locating the module that `-m` runs
    from tasks.stage import fail_fast

    fail_fast(list(getattr(sys, "orig_argv", [])))
