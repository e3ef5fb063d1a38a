"""Packaging for a device: the bundle folder, the trtexec script and JETSON.md, INTEL.md.

Reads graph metadata through :mod:`..graphs`; imports nothing from :mod:`..proofs`.
"""
