"""The --disaggregation-mode flag shared by dispatcher and scheduler."""

from __future__ import annotations

# SGLang's names: "null" is a non-PD (mixed) deployment.
MODE_TO_ROLE = {"null": "mixed", "mixed": "mixed", "prefill": "prefill", "decode": "decode"}


def role_of_mode(mode: str) -> str:
    try:
        return MODE_TO_ROLE[mode]
    except KeyError:
        raise SystemExit(f"--disaggregation-mode {mode!r}: choose null, prefill or decode") from None
