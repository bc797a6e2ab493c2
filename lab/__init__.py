"""The lab: a small real QEMU guest with a real qemu-guest-agent, for tests and the demo.

Not part of the engine (the engine never imports it): ``snapferry.lab.vm`` boots and
drives the lab VM, ``snapferry.lab.initramfs`` builds its kernel + initramfs from
installed Debian packages, ``snapferry.lab.check`` reads and judges lab disk images
from the host, ``snapferry.lab.demo`` is ``snapferry demo``. The CLI turns the ``lab``
target into the lab VM's QEMU URI (``snapferry.lab.vm.lab_target``).
"""
