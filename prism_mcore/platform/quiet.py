"""Imported first by the rank fork server, so that Megatron's import-time warnings about missing
Transformer Engine / apex are filtered in every rank forked from it."""
from prism_mcore.platform import quiet_expected_warnings

quiet_expected_warnings()
