"""Delivery of DICOM instances to a PACS: C-STORE (DIMSE) and STOW-RS (DICOMweb) senders and a
durable on-disk spool that retries with backoff until every instance is confirmed.

Shared core: the slide scanner and, later, the ultrasound daemon send through it. See docs/pacs.md.
"""
