"""Imported first by the rank fork server (and by the `prism` CLI), so that Megatron's import-time warnings
about missing Transformer Engine / apex, and third-party FutureWarnings, are filtered in every rank forked
from it.

FutureWarnings come from torch / Megatron / transformers internals (e.g. Megatron's dist checkpointing
calls torch's deprecated `load_state_dict`, torch deprecates its own ShardedTensor); a user can act on none
of them, and prism_mcore itself raises none. Processes we start without forking (vLLM engines, Ray workers)
get the same filter through PYTHONWARNINGS, which a child interpreter reads at start-up.
"""
import os
import warnings

from prism_mcore.platform import quiet_expected_warnings

_IGNORE_FUTURE = "ignore::FutureWarning"


def quiet_third_party_future_warnings() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    current = os.environ.get("PYTHONWARNINGS", "")
    if _IGNORE_FUTURE not in current.split(","):
        os.environ["PYTHONWARNINGS"] = f"{current},{_IGNORE_FUTURE}" if current else _IGNORE_FUTURE


quiet_expected_warnings()
quiet_third_party_future_warnings()
