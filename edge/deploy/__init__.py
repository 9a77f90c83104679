"""Signed model releases on the device (issue 20; wire format: edge/fleet/RELEASE_FORMAT.md).

``[deploy]`` (off by default). The parts, each one concept: ``store`` (files under
``<state_dir>/deploy``), ``download`` (resumable, bounded chunks), ``gate`` (verify
before unpack, compile and parity with the device's own serving choice), ``shadow`` (the
sequential paired test, pure), ``shadowrun`` and ``tap`` (the candidate on a share of
live windows), ``agent`` (the steps and the reports), ``active`` (what a start serves,
the restart that switches), ``part`` (what the daemon builds).
"""
