"""The `incubation` command (`python -m incubation.cli`, the `incubation` entry point).

- `options`: argument types and the common options (the fields of `pipeline.RunSpec`);
- `exits`: the exit policy (one line for the user's faults, a traceback for bugs);
- `commands`: the subcommand table and its handlers, `build_parser` and `main`.
"""
from ..errors import UsageError
from ..train.checkpoint import save_checkpoint  # expand writes through this name (tests replace it)
from .commands import SUBCOMMANDS, build_parser, main
from .exits import EXIT_STATUS, error_message, run_main
from .options import (
                      add_common_arguments,
                      common_argv,
                      data_name,
                      device_name,
                      non_negative_int,
                      nonempty_path,
                      out_dir,
                      output_prefix,
                      positive_float,
                      positive_int,
                      positive_ints,
                      seed_int,
                      spec_from_args,
)

__all__ = ["main", "SUBCOMMANDS", "add_common_arguments", "common_argv", "build_parser", "UsageError",
           "error_message", "run_main", "positive_int", "non_negative_int", "seed_int", "positive_float",
           "positive_ints", "nonempty_path", "out_dir", "output_prefix", "device_name", "data_name", "EXIT_STATUS",
           "spec_from_args", "save_checkpoint"]
