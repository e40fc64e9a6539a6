"""Device simulators that speak the same bytes as the real hardware.

``SIMULATORS`` maps the name used by ``medge sim NAME`` to the module implementing it. Each
module provides ``HELP`` (one line), ``add_arguments(parser)`` for its own options (documenting
defaults in ``--help``), and ``create(args) -> Handler`` returning the coroutine function that
serves one host connection (see :mod:`firmware_sim.link`). A module may also provide
``async def background(args, server)`` for work that runs while the simulator is up.
"""

SIMULATORS: dict[str, str] = {
    "dynamixel": "firmware_sim.dynamixel",
    "force": "firmware_sim.force",
    "ultrasound": "firmware_sim.ultrasound_grabber",
    "astm-urine": "firmware_sim.astm_urine",
    "printout-urine": "firmware_sim.printout_urine",
    "uroflow": "firmware_sim.uroflow",
    "grbl": "firmware_sim.grbl",
    "cms50": "firmware_sim.cms50",
    "modbus-vent": "firmware_sim.modbus_vent",
}
