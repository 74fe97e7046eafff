"""Xray's files and process: the only code that reads or writes them, or runs Xray.

`daemon/xray_sync.py` is the entry point and says which module holds what. Pure Xray knowledge
(rendering, drift, migration plans) lives in `daemon.xray`; this package does the I/O.
"""
