"""The console logger ``sd-assets demo`` runs with: Dagster's console lines, each cut to its first.

A failed step's event carries its error and stack trace, tens of lines above the demo's own
summary, which says the error in one line when the run ends (and shows the stack of an error
that is not the project's own). The run's whole log, stack traces included, stays in the
instance. Runs that name no logger (``dagster job execute``, the UI, the daemon) keep Dagster's.
"""

import logging
import sys

import dagster as dg

BRIEF_CONSOLE = "brief_console"


class _FirstLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).split("\n", 1)[0]


class _LevelOrPoolWait(logging.Filter):
    """Records at ``level`` or above, and Dagster's DEBUG line saying a step waits for a pool slot
    ("Step blocked by limit for pool gpu", then "still blocked" now and then): while another run
    holds the production instance's gpu slots, that line is all that tells a waiting demo from a hung one."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or "blocked by limit for pool " in record.getMessage()


@dg.logger(
    config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
    description="Dagster's console lines, each cut to its first line (what sd-assets demo shows).",
)
def brief_console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    # A logger of its own, not logging.getLogger's: each run's gets its own handler, and none is left behind.
    logger = logging.Logger(BRIEF_CONSOLE, level=logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_LevelOrPoolWait(logging.getLevelName(init_context.logger_config["log_level"].upper())))
    handler.setFormatter(_FirstLine("%(asctime)s - %(levelname)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S %z"))
    logger.addHandler(handler)
    return logger
