"""The one error type the data layer raises."""
from __future__ import annotations


class DataError(ValueError):
    """A data file that cannot be used at all, in one line naming the file and the column, row or field.

    Raised only for whole-file problems found before training starts (missing file, missing column,
    no usable line). A single bad row is skipped and counted instead, so a long run never dies on it.
    `exit_code` lets the CLI exit with the same status as for a config error.
    """

    exit_code = 2
