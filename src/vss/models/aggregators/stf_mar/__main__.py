"""``python -m vss.models.aggregators.stf_mar``: the memory files from the command line (:func:`vss.passes.main`)."""

from vss.passes import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m vss.models.aggregators.stf_mar"))
