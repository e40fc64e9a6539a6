"""The sonographer's teleoperation console: a loopback web page driving the manipulator.

``medge console`` (medge/consolecli.py) serves :mod:`medge.console.server`; docs/console.md.
"""
