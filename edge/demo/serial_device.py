"""The demo's serial device: a simulated machine behind emulated MCU firmware on a pty.

The firmware simulator speaks the binary firmware_bridge protocol (HELLO, then SAMPLES
frames of int16 at 1 kHz) on one end of a pseudo-terminal; the daemon's serial source
opens the other end by its path, exactly as it would open /dev/ttyUSB0.
"""
from __future__ import annotations

import time

from firmware_bridge.sim import FirmwareSim

from edge.demo.devices import SimDevice


class SerialDevice:
    def __init__(self, sim: SimDevice):
        self.sim = sim
        self._started = False
        self.fw = FirmwareSim(source=self._read, protocol="binary", device_id=sim.name, firmware="demo 1.0",
                              sample_rate=sim.machine.sample_rate,
                              keep_sent=0)

    def _read(self, n: int):
        if not self._started:
            # the firmware starts streaming when the daemon opens the port, and the host
            # maps device time to its own clock then: the schedule starts there too
            self._started = True
            self.sim.t0 = self.sim.machine.t0 = time.time()
        return self.sim.read(n)

    @property
    def path(self) -> str:
        return self.fw.path

    def start(self) -> None:
        self.fw.start()

    def stop(self) -> None:
        self.fw.stop()
